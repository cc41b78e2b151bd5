"""What encrypted bundles cost: decrypt + verify of a 50 MB bundle against sha256 of it.

A bundle with a 50 MB random payload is packed encrypted for one recipient
(``edgectl pack --encrypt-to``: AES-256-GCM in 64 KiB chunks, the content key wrapped
with X25519). Side by side in the same process, median of N with a warm page cache:

- sha256 of the bundle file alone (the baseline);
- ``verify_bundle`` of the encrypted bundle without decrypting (every check, every
  ciphertext byte hashed);
- verify + decrypt: every check, then every chunk decrypted and authenticated, the
  plaintext discarded (the cost of the cryptography; goal <= 2x sha256);
- verify + decrypt into a staging directory (write + fsync), as the device installs it,
  next to the plain bundle's verify + extract, so that what encryption adds to an install
  is visible.

Memory: packing (encrypting) and verify + decrypt into staging each run in a child
process; their peak RSS is reported next to a child that only imports the same modules,
to show that memory does not grow with the bundle (one chunk is held at a time).

Run: ``.venv/bin/python benchmarks/encryption.py`` (``--quick`` for 10 MB and 3 repeats).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import add_common_args, print_table, write_results

from edge_sdk.bundle import BundleSpec, Manifest, pack_bundle, verify_bundle
from edge_sdk.bundle.archive import BundleReader
from edge_sdk.bundle.encryption import FileDecryptor
from edge_sdk.trust import RecipientKey, SigningKey, TrustedKeys

GOAL = 2.0
NOW = 1_700_000_000.0


def _payload(path: Path, size_mb: int) -> None:
    rng = np.random.default_rng(1)
    with open(path, "wb") as fh:
        for _ in range(size_mb):
            fh.write(rng.bytes(1 << 20))


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(args: argparse.Namespace) -> int:
    """One measured action in a fresh process; prints its peak RSS as JSON."""
    work = Path(args.work)
    key = SigningKey.from_pem((work / "sign.pem").read_bytes())
    device = RecipientKey.from_pem((work / "device.pem").read_bytes())
    if args.child == "pack":
        spec = BundleSpec("big", 1, "onnxruntime", work / "big.onnx", ttl_s=3600, encrypt_to=(device.public,))
        pack_bundle(spec, [key], work / "child.edge", NOW)
    elif args.child == "decrypt":
        with tempfile.TemporaryDirectory(dir=work) as d:
            trusted = TrustedKeys((key.public_key,))
            verify_bundle(work / "enc.edge", trusted, NOW + 1, extract_to=Path(d), decrypt_with=device)
    print(json.dumps({"maxrss_mib": _maxrss_mib()}))
    return 0


def _in_child(mode: str, work: Path) -> float:
    out = subprocess.run(
        [sys.executable, __file__, "--child", mode, "--work", str(work)], capture_output=True, text=True, check=True
    )
    return float(json.loads(out.stdout.strip().splitlines()[-1])["maxrss_mib"])


def run(size_mb: int, repeats: int, work: Path) -> dict[str, object]:
    key, device = SigningKey.generate(), RecipientKey.generate()
    (work / "sign.pem").write_bytes(key.to_pem())
    (work / "device.pem").write_bytes(device.to_pem())
    payload = work / "big.onnx"
    _payload(payload, size_mb)
    plain, enc = work / "plain.edge", work / "enc.edge"
    pack_bundle(BundleSpec("big", 1, "onnxruntime", payload, ttl_s=3600), [key], plain, NOW)
    spec = BundleSpec("big", 1, "onnxruntime", payload, ttl_s=3600, encrypt_to=(device.public,))
    t = time.perf_counter()
    pack_bundle(spec, [key], enc, NOW)
    pack_s = time.perf_counter() - t
    trusted = TrustedKeys((key.public_key,))
    now = NOW + 1

    def sha_only() -> None:
        h = hashlib.sha256()
        with open(enc, "rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
        h.hexdigest()

    def verify_only() -> None:
        verify_bundle(enc, trusted, now)

    def verify_decrypt() -> None:
        manifest: Manifest = verify_bundle(enc, trusted, now).manifest
        assert manifest.encryption is not None
        content_key = manifest.encryption.content_key(device)
        with BundleReader(enc) as reader:
            for entry in manifest.files:
                dec = FileDecryptor(content_key, manifest.encryption.file(entry.path), manifest.encryption.chunk_size)
                for block in reader.iter_member(entry.path, entry.size):
                    dec.update(block)
                dec.finalize()

    def decrypt_to_staging() -> None:
        with tempfile.TemporaryDirectory(dir=work) as d:
            verify_bundle(enc, trusted, now, extract_to=Path(d), decrypt_with=device)

    def plain_extract() -> None:
        with tempfile.TemporaryDirectory(dir=work) as d:
            verify_bundle(plain, trusted, now, extract_to=Path(d))

    steps = {
        "sha256 of the bundle alone": sha_only,
        "verify, no decryption": verify_only,
        "verify + decrypt (plaintext discarded)": verify_decrypt,
        "verify + decrypt into staging (write + fsync)": decrypt_to_staging,
        "plain bundle: verify + extract into staging": plain_extract,
    }
    sha_only(), verify_decrypt()  # warm the page cache
    timings: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, fn in steps.items():
            t = time.perf_counter()
            fn()
            timings[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in timings.items()}
    memory = {mode: _in_child(mode, work) for mode in ("imports only", "pack", "decrypt")}
    return {
        "payload_bytes": payload.stat().st_size,
        "bundle_bytes": enc.stat().st_size,
        "pack_encrypted_s": pack_s,
        "median_s": med,
        "runs_s": timings,
        "ratio_decrypt_verify_to_sha256": med["verify + decrypt (plaintext discarded)"]
        / med["sha256 of the bundle alone"],
        "ratio_decrypt_to_staging_vs_plain_extract": med["verify + decrypt into staging (write + fsync)"]
        / med["plain bundle: verify + extract into staging"],
        "peak_rss_mib": memory,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    add_common_args(parser)
    args = parser.parse_args()
    if args.child:
        return _child(args)
    if args.quick:
        args.size_mb, args.repeats = 10, 3
    with tempfile.TemporaryDirectory(prefix="edge-encrypt-") as tmp:
        res = run(args.size_mb, args.repeats, Path(tmp))
    size = int(res["bundle_bytes"])  # type: ignore[call-overload]
    med: dict[str, float] = res["median_s"]  # type: ignore[assignment]
    base = med["sha256 of the bundle alone"]
    print(f"\nEncrypted bundle, {size / 1e6:.1f} MB, median of {args.repeats} (page cache warm)\n")
    print_table(
        ["", "median s", "MB/s", "x sha256"],
        [(k, f"{v:.4f}", f"{size / v / 1e6:.0f}", f"{v / base:.3f}") for k, v in med.items()],
    )
    rss: dict[str, float] = res["peak_rss_mib"]  # type: ignore[assignment]
    print(f"\nPeak RSS of a fresh process, {args.size_mb} MiB payload\n")
    print_table(
        ["process", "peak RSS MiB", "above imports"],
        [(k, f"{v:.1f}", f"{v - rss['imports only']:.1f}") for k, v in rss.items()],
    )
    ratio = float(res["ratio_decrypt_verify_to_sha256"])  # type: ignore[arg-type]
    ok = ratio <= GOAL
    print(f"\nverify + decrypt / sha256 = {ratio:.3f} (goal <= {GOAL}: {'met' if ok else 'MISSED'})")
    path = write_results("encryption", res, args.json_out)
    print(f"results: {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
