"""Source integrity of the prepare stage: JPEGs that decode but are corrupt, and checksum lists of the raw data.

The attack (``tests.data.corruption.overwrite_mid_scan``): 200 bytes at 60% of a real sample JPEG overwritten
inside its entropy-coded scan. Pillow decodes the result without a word; libjpeg-turbo's warning ("Corrupt
JPEG data: ...") must stop the stage, or skip the image with ``skip_corrupt``. The embedded sample ships
``SHA256SUMS`` (``sha256sum`` format); user data may name a checksum list (``datasets.<name>.checksums``).
Stage tests run the real entry point, ``pipelines.prepare.main``.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pipelines.prepare import main as prepare_main
from study.config import ConfigError, parse_params
from study.data.celeba import CorruptImageError, load_image, prepare_celeba, preprocess, read_partition
from study.data.store import load_split, read_manifest
from tests.data.corruption import overwrite_mid_scan
from tests.data.lsun_fixtures import build_lmdb, load_photo, lsun_jpeg, train_test_records

ATTACKED = "000003.jpg"  # a train image of the sample


def _pillow(data: bytes) -> np.ndarray:
    """Pillow's full decode, uint8 (H, W, 3): what the stage used before it checked libjpeg's warnings."""
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return np.asarray(im.convert("RGB"))


def _params(tmp_path: Path, dataset: dict, name: str = "celeba", output: str = "prepared") -> Path:
    path = tmp_path / f"params-{output}.yaml"
    path.write_text(yaml.safe_dump({
        "datasets": {name: dataset},
        "prepare": {"resolution": 32, "output_root": str(tmp_path / output)},
        "sweep": {"dataset": name},
    }))
    return path


def _celeba(root: Path, **extra) -> dict:
    return {"kind": "celeba", "root": str(root), **{k: str(v) for k, v in extra.items()}}


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _attack(root: Path, name: str = ATTACKED) -> Path:
    path = root / "img_align_celeba" / name
    path.write_bytes(overwrite_mid_scan(path.read_bytes()))
    return path


# ------------------------------------------------------------------------------- decodable but corrupt JPEGs
def test_mid_scan_overwrite_decodes_silently_in_pillow_but_is_wrong(sample_root):
    """The attack's premise: Pillow decodes the damaged file to the right size and far-off pixels."""
    original = (sample_root / "img_align_celeba" / ATTACKED).read_bytes()
    attacked = overwrite_mid_scan(original)
    assert len(attacked) == len(original)
    good, bad = _pillow(original).astype(np.float64), _pillow(attacked).astype(np.float64)
    assert bad.shape == good.shape == (218, 178, 3)
    assert np.abs(bad - good).mean() > 10.0  # grey levels: the image is visibly wrong


def test_load_image_rejects_a_jpeg_libjpeg_warns_about(sample_copy):
    path = _attack(sample_copy)
    with pytest.raises(CorruptImageError, match=rf"{ATTACKED}.*Corrupt JPEG data"):
        load_image(path)


def test_sample_decodes_cleanly_to_pillows_pixels(sample_root):
    """No false positives on the 32 real images, and the pixels are Pillow's, bit for bit, so the prepared
    arrays are those of a Pillow-only pipeline (Larsen crop + blur + resize of ``_pillow``'s decode)."""
    folder = sample_root / "img_align_celeba"
    for path in sorted(folder.glob("*.jpg")):
        np.testing.assert_array_equal(load_image(path), _pillow(path.read_bytes()))
    arrays, info = prepare_celeba(sample_root, None, 32)
    assert info["skipped_count"] == 0
    for split, names in read_partition(sample_root / "list_eval_partition.txt").items():
        expected = np.stack([preprocess(_pillow((folder / n).read_bytes()), 32) for n in names])
        np.testing.assert_array_equal(arrays[split], expected)


def test_stage_stops_at_mid_scan_corruption_and_keeps_the_previous_output(tmp_path, sample_copy, capsys):
    (sample_copy / "SHA256SUMS").unlink()  # the decoder, not the checksum list, must catch it here
    params = _params(tmp_path, _celeba(sample_copy))
    assert prepare_main(["--params", str(params)]) == 0
    output = tmp_path / "prepared" / "celeba"
    before = _snapshot(output)
    _attack(sample_copy)
    capsys.readouterr()
    assert prepare_main(["--params", str(params)]) == 1
    err = capsys.readouterr().err
    assert ATTACKED in err and "Corrupt JPEG data" in err, err
    assert _snapshot(output) == before
    assert [p.name for p in output.parent.iterdir()] == ["celeba"]  # no temporary left behind


def test_skip_corrupt_leaves_out_the_mid_scan_corruption_and_counts_it(tmp_path, sample_copy, sample_root):
    (sample_copy / "SHA256SUMS").unlink()
    _attack(sample_copy)
    params = _params(tmp_path, _celeba(sample_copy))
    params.write_text(params.read_text().replace("resolution: 32", "resolution: 32\n  workers: 2"))
    assert prepare_main(["--params", str(params), "--skip-corrupt"]) == 0
    output = tmp_path / "prepared" / "celeba"
    manifest = read_manifest(output)
    assert manifest["skipped_count"] == 1 and manifest["skipped"]["train"] == [ATTACKED]
    assert "Corrupt JPEG data" in manifest["skipped_reasons"]["train"][ATTACKED]
    clean, _ = prepare_celeba(sample_root, None, 32)
    index = read_partition(sample_root / "list_eval_partition.txt")["train"].index(ATTACKED)
    np.testing.assert_array_equal(load_split(output, "train"), np.delete(clean["train"], index, axis=0))
    np.testing.assert_array_equal(load_split(output, "val"), clean["val"])


def test_scan_damage_the_decoder_misses_is_caught_by_the_checksum(sample_copy):
    """Random bytes can leave the Huffman decoder in step: no libjpeg warning, wrong pixels. Such a file passes
    the decoder check (the limit of any decoder) and fails against its digest, which is why the lists exist."""
    folder = sample_copy / "img_align_celeba"
    rng = np.random.default_rng(0)
    missed = []
    for path in sorted(folder.glob("*.jpg")):
        original = path.read_bytes()
        start = int(len(original) * 0.6)
        attacked = original[:start] + rng.integers(0, 256, 200, dtype=np.uint8).tobytes() + original[start + 200:]
        path.write_bytes(attacked)
        try:
            img = load_image(path)
        except CorruptImageError:
            continue
        if np.abs(img.astype(float) - _pillow(original)).mean() > 1.0:
            missed.append((path, hashlib.sha256(original).hexdigest()))
    assert missed  # with this seed: 2 of the 32 sample images (30 are caught by the decoder check)
    for path, digest in missed:
        with pytest.raises(CorruptImageError, match=rf"{path.name} does not match its sha256"):
            load_image(path, ("sha256", digest, "SHA256SUMS"))


def test_lsun_record_libjpeg_warns_about_is_corrupt(tmp_path):
    from study.data.lsun import CorruptRecordError, decode_record

    value = lsun_jpeg(load_photo(f"celeba/{ATTACKED}"))
    attacked = overwrite_mid_scan(value)
    assert np.abs(_pillow(attacked).astype(float) - _pillow(value)).mean() > 10.0  # Pillow alone accepts it
    np.testing.assert_array_equal(decode_record(b"k" * 40, value), _pillow(value))
    with pytest.raises(CorruptRecordError, match="k{40}.*Corrupt JPEG data"):
        decode_record(b"k" * 40, attacked)


# --------------------------------------------------------------------------------- the sample's SHA256SUMS
def test_shipped_sha256sums_cover_the_whole_sample(sample_root):
    """Checked with hashlib against the files themselves: every image and the partition file, nothing else."""
    listed = {}
    for line in (sample_root / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        listed[name.lstrip("*")] = digest
    expected = {"list_eval_partition.txt"} | {f"img_align_celeba/{p.name}"
                                              for p in (sample_root / "img_align_celeba").iterdir()}
    assert set(listed) == expected and len(listed) == 33
    for name, digest in listed.items():
        assert hashlib.sha256((sample_root / name).read_bytes()).hexdigest() == digest, name


def test_stage_verifies_the_sample_against_its_sha256sums(tmp_path, sample_root):
    assert prepare_main(["--params", str(_params(tmp_path, _celeba(sample_root)))]) == 0
    manifest = read_manifest(tmp_path / "prepared" / "celeba")
    assert manifest["checksums"] == {"file": str(sample_root / "SHA256SUMS"), "algorithm": "sha256", "verified": 33}


def test_sample_file_differing_from_sha256sums_fails_naming_it(tmp_path, sample_copy, capsys):
    path = sample_copy / "img_align_celeba" / "000027.jpg"  # a val image
    original = path.read_bytes()
    with Image.open(path) as im:  # re-encoded: a clean, correctly sized JPEG, so only the checksum can tell
        im.save(path, format="JPEG", quality=90)
    assert path.read_bytes() != original and load_image(path).shape == (218, 178, 3)
    params = _params(tmp_path, _celeba(sample_copy))
    capsys.readouterr()
    assert prepare_main(["--params", str(params)]) == 1
    err = capsys.readouterr().err
    assert "000027.jpg" in err and "sha256" in err and "SHA256SUMS" in err, err
    assert not (tmp_path / "prepared").exists()

    assert prepare_main(["--params", str(params), "--skip-corrupt"]) == 0  # skipped and counted
    manifest = read_manifest(tmp_path / "prepared" / "celeba")
    assert manifest["skipped"]["val"] == ["000027.jpg"] and manifest["skipped_count"] == 1
    assert "sha256" in manifest["skipped_reasons"]["val"]["000027.jpg"]
    assert manifest["checksums"]["verified"] == 32

    # The partition file cannot be skipped: a changed one stops the stage even with --skip-corrupt.
    path.write_bytes(original)
    partition = sample_copy / "list_eval_partition.txt"
    partition.write_text(partition.read_text() + "\n")
    capsys.readouterr()
    assert prepare_main(["--params", str(params), "--skip-corrupt"]) == 1
    err = capsys.readouterr().err
    assert "list_eval_partition.txt" in err and "sha256" in err, err


# ------------------------------------------------------------------------- user checksum lists (md5 format)
def _md5_list(folder: Path, names: list[str]) -> str:
    return "".join(f"{hashlib.md5((folder / n).read_bytes()).hexdigest()}  {n}\n" for n in names)


def test_user_md5_list_passes_when_right_and_fails_naming_a_wrong_or_missing_file(tmp_path, sample_copy, capsys):
    (sample_copy / "SHA256SUMS").unlink()
    images = sample_copy / "img_align_celeba"
    names = sorted(p.name for p in images.glob("*.jpg"))
    md5 = tmp_path / "img_align_celeba.md5"  # beside nothing: names are relative to the list's own folder
    md5.write_text(_md5_list(images, names).replace("  0", "  celeba/img_align_celeba/0"))
    params = _params(tmp_path, _celeba(sample_copy, checksums=md5))
    assert prepare_main(["--params", str(params)]) == 0
    manifest = read_manifest(tmp_path / "prepared" / "celeba")
    assert manifest["checksums"] == {"file": str(md5), "algorithm": "md5", "verified": 32}

    good = md5.read_text()
    line = next(x for x in good.splitlines() if x.endswith("000007.jpg"))
    wrong = ("0" if line[0] != "0" else "1") + line[1:]
    md5.write_text(good.replace(line, wrong))
    capsys.readouterr()
    assert prepare_main(["--params", str(params)]) == 1
    err = capsys.readouterr().err
    assert "000007.jpg" in err and "md5" in err, err

    # Listed but not there: a clear error naming it, before any image is decoded.
    md5.write_text(good + f"{'0' * 32}  celeba/img_align_celeba/202599.jpg\n")
    capsys.readouterr()
    assert prepare_main(["--params", str(params)]) == 1
    err = capsys.readouterr().err
    assert "202599.jpg" in err and "missing" in err, err

    # An image the stage reads but the list does not cover is an error too (a stale or partial list).
    md5.write_text("".join(x + "\n" for x in good.splitlines() if not x.endswith("000011.jpg")))
    capsys.readouterr()
    assert prepare_main(["--params", str(params)]) == 1
    err = capsys.readouterr().err
    assert "000011.jpg" in err and "not listed" in err, err


def test_checksum_list_algorithm_follows_digest_length(tmp_path):
    from study.data.integrity import read_checksums

    (tmp_path / "a.bin").write_bytes(b"abc")
    data = b"abc"
    sha = tmp_path / "SHA256SUMS"
    sha.write_text(f"# comment\n\n{hashlib.sha256(data).hexdigest()} *a.bin\n")
    listing = read_checksums(sha)
    assert listing.algorithm == "sha256" and listing.digests == {tmp_path / "a.bin": hashlib.sha256(data).hexdigest()}
    md5 = tmp_path / "MD5SUMS"
    md5.write_text(f"{hashlib.md5(data).hexdigest().upper()}  a.bin\n")
    assert read_checksums(md5).algorithm == "md5"
    assert read_checksums(md5).digests[tmp_path / "a.bin"] == hashlib.md5(data).hexdigest()
    sha1 = tmp_path / "SHA1SUMS"
    sha1.write_text(f"{hashlib.sha1(data).hexdigest()}  a.bin\n")
    with pytest.raises(ValueError, match=r"SHA1SUMS:1: .*40 hex.*md5.*sha256"):
        read_checksums(sha1)
    mixed = tmp_path / "MIXED"
    mixed.write_text(f"{hashlib.md5(data).hexdigest()}  a.bin\n{hashlib.sha256(data).hexdigest()}  b.bin\n")
    with pytest.raises(ValueError, match=r"MIXED:2: .*sha256.*md5"):
        read_checksums(mixed)


def test_checksums_key_is_validated():
    def parse(dataset):
        return parse_params({"datasets": {"d": dataset}, "sweep": {"dataset": "d"}}).datasets["d"]

    assert parse({"kind": "celeba", "checksums": "lists/celeba.md5"}).checksums == Path("lists/celeba.md5")
    assert parse({"kind": "lsun", "root": "/data/lsun", "checksums": "/data/lsun/SHA256SUMS"}).checksums
    assert parse({"kind": "celeba"}).checksums is None
    with pytest.raises(ConfigError, match="datasets.d.celeba.checksums"):
        parse({"kind": "celeba", "checksums": ""})
    with pytest.raises(ConfigError, match="datasets.d.lsun.checksums"):
        parse({"kind": "lsun", "root": "/data/lsun", "checksums": ["a", "b"]})


def test_lsun_checksums_of_the_lmdb_data_files(tmp_path, capsys):
    train, test = train_test_records()
    root = tmp_path / "lsun"
    build_lmdb(root / "church_outdoor_train_lmdb", train)
    build_lmdb(root / "church_outdoor_val_lmdb", test)
    names = ["church_outdoor_train_lmdb/data.mdb", "church_outdoor_val_lmdb/data.mdb"]
    sums = root / "SHA256SUMS"
    sums.write_text("".join(f"{hashlib.sha256((root / n).read_bytes()).hexdigest()}  {n}\n" for n in names))
    params = _params(tmp_path, {"kind": "lsun", "root": str(root), "val_fraction": 0.1, "checksums": str(sums)},
                     name="church")
    assert prepare_main(["--params", str(params)]) == 0
    manifest = read_manifest(tmp_path / "prepared" / "church")
    assert manifest["checksums"] == {"file": str(sums), "algorithm": "sha256", "verified": 2}

    good = sums.read_text()
    sums.write_text(good.replace(good[:8], "00000000", 1) if not good.startswith("00000000") else "1" + good[1:])
    capsys.readouterr()
    assert prepare_main(["--params", str(params), "--skip-corrupt"]) == 1  # an LMDB cannot be skipped
    err = capsys.readouterr().err
    assert "church_outdoor_train_lmdb/data.mdb" in err and "sha256" in err, err

    sums.write_text(good.splitlines()[0] + "\n")  # the val LMDB is read but not listed
    capsys.readouterr()
    assert prepare_main(["--params", str(params)]) == 1
    err = capsys.readouterr().err
    assert "church_outdoor_val_lmdb/data.mdb" in err and "not listed" in err, err
