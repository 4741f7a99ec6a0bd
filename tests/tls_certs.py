"""Throw-away TLS material for tests: a CA, a server certificate for 127.0.0.1/localhost and a client
certificate, made with the ``openssl`` command line (present wherever redis-server is built with TLS)."""
from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass


class CertError(RuntimeError):
    """openssl is missing or failed."""


@dataclass(frozen=True)
class Certs:
    """Paths of the generated files (PEM)."""

    dir: str
    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str

    def query(self, *, client_cert: bool = True) -> str:
        """The redis-py TLS options of a ``rediss://`` URL's query string."""
        q = f"ssl_ca_certs={self.ca}&ssl_cert_reqs=required"
        if client_cert:
            q += f"&ssl_certfile={self.client_cert}&ssl_keyfile={self.client_key}"
        return q


def _run(*args: str, cwd: str) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise CertError(f"openssl {' '.join(args[:2])} failed: {proc.stderr[-1000:]}")


def make_certs(directory: str, days: int = 2) -> Certs:
    """CA + server (SAN 127.0.0.1, localhost) + client certificates, RSA 2048, valid ``days`` days."""
    if shutil.which("openssl") is None:
        raise CertError("openssl is not installed")
    os.makedirs(directory, exist_ok=True)
    d = directory
    _run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days",
         str(days), "-subj", "/CN=hexgen-test-ca", cwd=d)
    with open(os.path.join(d, "server.ext"), "w", encoding="ascii") as f:
        f.write("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    with open(os.path.join(d, "client.ext"), "w", encoding="ascii") as f:
        f.write("extendedKeyUsage=clientAuth\n")
    for name in ("server", "client"):
        _run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj",
             f"/CN=hexgen-test-{name}", cwd=d)
        _run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", f"{name}.crt", "-days", str(days), "-extfile", f"{name}.ext", cwd=d)
    for name in ("ca.key", "server.key", "client.key"):
        os.chmod(os.path.join(d, name), 0o600)
    p = lambda n: os.path.join(d, n)  # noqa: E731
    return Certs(d, p("ca.crt"), p("server.crt"), p("server.key"), p("client.crt"), p("client.key"))
