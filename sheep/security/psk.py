"""TLS-PSK on the server side of an ssl.SSLContext (NBD's, as nbdkit --tls-psk offers it):
a client may prove a pre-shared key instead of showing a certificate.

Python 3.11's ssl module has no PSK API (SSLContext.set_psk_server_callback came in
3.13), so this module calls OpenSSL itself, through ctypes, on the SSL_CTX of the
context. Why this way and not a package: the PyPI ones (sslpsk, sslpsk2, sslpsk3) are C
extensions built against whatever OpenSSL headers the build finds, and set the callback
per socket through ssl.wrap_socket or their own wrap calls; asyncio's start_tls makes its
SSLObject itself (context.wrap_bio) and starts the handshake at once, so a callback has to
sit on the context. ctypes needs no compiler, and it reaches OpenSSL through the `_ssl`
extension's own handle (dlsym searches that library's dependencies), so the functions
called are those of the very libssl the SSLContext lives in, never another copy (such as
the one the `cryptography` wheel carries inside itself).

What it relies on, checked before use (PskUnavailable, one line, if anything differs):
- CPython's PySSLContext holds `SSL_CTX *ctx` right after PyObject_HEAD: the pointer read
  there must give SSL_CTX_get_options() == context.options;
- its _ssl._SSLSocket holds `SSL *ssl` after PyObject_HEAD and one PyObject*, and sets
  itself as the SSL's app data (ex_data 0): each pointer read there must give
  SSL_get_SSL_CTX() == the context's SSL_CTX and SSL_get_ex_data(ssl, 0) == the object.

TLS 1.3 only. OpenSSL's server callback (the one GnuTLS clients such as QEMU and libnbd
meet) gives a TLS 1.3 PSK the hash SHA-256, and OpenSSL drops the PSK when the cipher suite
it picked has another hash; Python's default order puts TLS_AES_256_GCM_SHA384 first, so
the SHA-256 suites go first here (AES-128-GCM and ChaCha20 are as sound). With that, TLS
1.3 PSK interoperates with GnuTLS (tested with QEMU and nbdinfo), with forward secrecy
(OpenSSL takes only psk_dhe_ke unless told otherwise). The TLS 1.2 PSK suites stay off, as
Python's default cipher list leaves them: none is needed by a GnuTLS of TLS 1.3 (3.6.5 on),
and plain PSK has no forward secrecy. Session tickets are off: a session resumed from a
ticket would carry neither a certificate nor a PSK identity to know its client by.

Who connected: OpenSSL 3.0 keeps no identity for a TLS 1.3 PSK (SSL_get_psk_identity is
NULL then), so the callback notes the identity it gave a key for against the SSLObject
being handshaken, found by its SSL* among the objects this context made (wrap_bio); the
note lives as long as that object, and a PSK whose binder does not verify fails the
handshake, so a noted identity after a finished handshake is the one the client proved.
"""

from __future__ import annotations

import _ssl
import ctypes
import logging
import ssl
import weakref
from collections.abc import Callable

log = logging.getLogger(__name__)

# SHA-256 suites first (see the module text), then the rest of OpenSSL's TLS 1.3 default
TLS13_SUITES = b"TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_256_GCM_SHA384"

_PSK_SERVER_CB = ctypes.CFUNCTYPE(ctypes.c_uint, ctypes.c_void_p, ctypes.c_char_p,
                                  ctypes.POINTER(ctypes.c_ubyte), ctypes.c_uint)
_HEAD = object.__basicsize__  # PyObject_HEAD
_PTR = ctypes.sizeof(ctypes.c_void_p)


class PskUnavailable(Exception):
    """This Python's ssl module cannot be given TLS-PSK, said in one line."""


def _bind(lib: ctypes.CDLL, name: str, restype, *argtypes):
    try:
        fn = getattr(lib, name)
    except AttributeError:
        raise PskUnavailable(f"the OpenSSL of Python's ssl module has no {name}") from None
    fn.restype, fn.argtypes = restype, list(argtypes)
    return fn


class _Libssl:
    """The functions used, from the libssl that `_ssl` is linked to."""

    def __init__(self) -> None:
        lib = ctypes.CDLL(_ssl.__file__)  # already loaded: its handle, its dependencies
        version = _bind(lib, "OpenSSL_version_num", ctypes.c_ulong)()
        if version != ssl.OPENSSL_VERSION_NUMBER:
            raise PskUnavailable(f"libssl {version:#x} found through _ssl is not the "
                                 f"{ssl.OPENSSL_VERSION_NUMBER:#x} the ssl module reports")
        vp = ctypes.c_void_p
        self.ctx_options = _bind(lib, "SSL_CTX_get_options", ctypes.c_uint64, vp)
        self.set_ciphersuites = _bind(lib, "SSL_CTX_set_ciphersuites", ctypes.c_int, vp,
                                      ctypes.c_char_p)
        self.set_psk_server_callback = _bind(lib, "SSL_CTX_set_psk_server_callback", None,
                                             vp, _PSK_SERVER_CB)
        self.ssl_ctx = _bind(lib, "SSL_get_SSL_CTX", vp, vp)
        self.ex_data = _bind(lib, "SSL_get_ex_data", vp, vp, ctypes.c_int)


_lib: _Libssl | None = None


def _libssl() -> _Libssl:
    global _lib
    if _lib is None:
        _lib = _Libssl()
    return _lib


def _ctx_pointer(context: ssl.SSLContext) -> int:
    ptr = ctypes.c_void_p.from_address(id(context) + _HEAD).value
    if not ptr or _libssl().ctx_options(ptr) != int(context.options):
        raise PskUnavailable("this Python's SSLContext is not laid out as sheep.security.psk "
                             "expects (no SSL_CTX where CPython 3.11 keeps it)")
    return ptr


class PskServerContext(ssl.SSLContext):
    """A server SSLContext that, once given keys (accept_psk), also admits a TLS 1.3
    client that proves one, and says which (psk_identity)."""

    _psk_ctx = 0  # the SSL_CTX*, once accept_psk verified it

    def accept_psk(self, key_of: Callable[[bytes], bytes | None]) -> None:
        """From now on a client may prove the key `key_of(identity)` returns (None: no
        such identity) instead of showing a certificate."""
        self._key_of = key_of
        if self._psk_ctx:
            return
        lib = _libssl()
        ptr = _ctx_pointer(self)
        if lib.set_ciphersuites(ptr, TLS13_SUITES) != 1:
            raise PskUnavailable("OpenSSL refused the TLS 1.3 cipher suites for PSK")
        self.num_tickets = 0
        self._live: weakref.WeakValueDictionary[int, ssl.SSLObject] = \
            weakref.WeakValueDictionary()
        self._proved: weakref.WeakKeyDictionary[ssl.SSLObject, bytes] = \
            weakref.WeakKeyDictionary()
        self._callback = _PSK_SERVER_CB(self._psk)  # OpenSSL holds only its address
        lib.set_psk_server_callback(ptr, self._callback)
        self._psk_ctx = ptr
        # one object made and checked now: a layout this module misreads fails here, at
        # start, not with the first client
        self.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_side=True)

    def wrap_bio(self, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO,
                 server_side: bool = False, server_hostname: str | bytes | None = None,
                 session: ssl.SSLSession | None = None) -> ssl.SSLObject:
        obj = super().wrap_bio(incoming, outgoing, server_side, server_hostname, session)
        if self._psk_ctx:
            self._live[self._ssl_pointer(obj)] = obj
        return obj

    def psk_identity(self, obj: ssl.SSLObject) -> bytes | None:
        """The identity whose key the client of `obj` proved (None: it proved none)."""
        return self._proved.get(obj) if self._psk_ctx else None

    def _ssl_pointer(self, obj: ssl.SSLObject) -> int:
        inner = obj._sslobj  # type: ignore[attr-defined]
        if type(inner) is not _ssl._SSLSocket:
            raise PskUnavailable(f"an SSLObject wraps a {type(inner).__name__}, not the "
                                 "_ssl._SSLSocket sheep.security.psk expects")
        ptr = ctypes.c_void_p.from_address(id(inner) + _HEAD + _PTR).value
        lib = _libssl()
        if not ptr or lib.ssl_ctx(ptr) != self._psk_ctx or lib.ex_data(ptr, 0) != id(inner):
            raise PskUnavailable("this Python's _ssl._SSLSocket is not laid out as "
                                 "sheep.security.psk expects (no SSL* where CPython 3.11 "
                                 "keeps it)")
        return ptr

    def _psk(self, ssl_ptr: int, identity: bytes | None, out, max_len: int) -> int:
        """OpenSSL's server callback: the key's length, written to `out`; 0 refuses."""
        try:
            obj = self._live.get(ssl_ptr or 0)
            if obj is None or identity is None:
                return 0
            key = self._key_of(identity)
            if key is None or len(key) > max_len:
                return 0
            ctypes.memmove(out, key, len(key))
            self._proved[obj] = identity
            return len(key)
        except Exception:  # never into OpenSSL: it would print and refuse anyway
            log.exception("TLS-PSK callback failed")
            return 0
