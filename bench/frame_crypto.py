"""What protecting one data-plane frame costs, primitive by primitive, in this process:

    python -m bench.frame_crypto [--seconds S]

Issue 16 allows the data plane a session authenticated by TLS and then a cheaper per-frame
MAC instead of TLS's encryption, if encryption costs too much. This measures whether a MAC
is cheaper at all here: AES-128-GCM and AES-256-GCM (what TLS 1.3 encrypts records with,
through OpenSSL, as the `cryptography` package calls it), ChaCha20-Poly1305, and the MACs a
plaintext frame could carry instead: GMAC (AES-GCM over the frame as associated data, no
ciphertext; once in one call, as a benchmark of the primitive, and once as a session would
have to call it per frame, header and payload fed apart so the payload is not copied),
keyed BLAKE2b and HMAC-SHA256 from hashlib. Sizes are
a 4 KiB frame (48-byte header + payload) and a 1 MiB one. Each figure is the best of 5
runs (the least disturbed by other load), in µs per frame and MB/s.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import os
import time
from collections.abc import Callable

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from sheep.dataplane.wire import HEADER_SIZE

HEADER = HEADER_SIZE
SIZES = (HEADER + (4 << 10), HEADER + (1 << 20))


def per_call(fn: Callable[[], object], seconds: float) -> float:
    """Seconds per call: the best of 5 timed batches of about `seconds` / 5 each."""
    n, start = 1, time.perf_counter()
    while time.perf_counter() - start < 0.01:  # calibrate
        fn()
        n += 1
    batch = max(1, int(n / (time.perf_counter() - start) * seconds / 5))
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(batch):
            fn()
        best = min(best, (time.perf_counter() - t) / batch)
    return best


def frame_gmac(aes: algorithms.AES, nonce: bytes, data: bytes) -> bytes:
    """The tag a MAC-only session would send: GCM with header and payload as associated
    data, fed in two parts (the payload is not copied next to its header)."""
    tagger = Cipher(aes, modes.GCM(nonce)).encryptor()
    view = memoryview(data)
    tagger.authenticate_additional_data(view[:HEADER])
    tagger.authenticate_additional_data(view[HEADER:])
    tagger.finalize()
    return tagger.tag


def primitives(data: bytes) -> dict[str, Callable[[], object]]:
    key, nonce = os.urandom(32), os.urandom(12)
    gcm128, gcm256, chacha = AESGCM(key[:16]), AESGCM(key), ChaCha20Poly1305(key)
    aes128 = algorithms.AES(key[:16])
    return {
        "AES-128-GCM (TLS record)": lambda: gcm128.encrypt(nonce, data, None),
        "AES-256-GCM (TLS record)": lambda: gcm256.encrypt(nonce, data, None),
        "ChaCha20-Poly1305": lambda: chacha.encrypt(nonce, data, None),
        "AES-128-GMAC (GCM, frame as AAD)": lambda: gcm128.encrypt(nonce, b"", data),
        "AES-128-GMAC of header + payload, per frame": lambda: frame_gmac(aes128, nonce, data),
        "BLAKE2b keyed MAC": lambda: hashlib.blake2b(data, key=key, digest_size=16).digest(),
        "HMAC-SHA256": lambda: hmac.digest(key, data, "sha256"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.frame_crypto", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=1.0, help="time per measurement")
    args = parser.parse_args(argv)
    print(f"| primitive | {' | '.join(f'{s - HEADER >> 10} KiB frame' for s in SIZES)} |")
    print(f"|---|{'---:|' * len(SIZES)}")
    rows: dict[str, list[str]] = {}
    for size in SIZES:
        data = os.urandom(size)
        for name, fn in primitives(data).items():
            t = per_call(fn, args.seconds)
            rows.setdefault(name, []).append(f"{t * 1e6:,.1f} µs ({size / t / 1e6:,.0f} MB/s)")
    for name, cells in rows.items():
        print(f"| {name} | {' | '.join(cells)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
