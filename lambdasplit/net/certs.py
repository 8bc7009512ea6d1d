"""Throwaway TLS certificates for loopback servers: a fresh CA and a server certificate it signed.

For tests and demonstrations (`lambdasplit eavesdrop --tls`), never for a deployment: the CA's key is
thrown away with the folder, and the certificates expire after a day. Made with the `cryptography`
package when it is installed, else with the `openssl` command; if neither is there, CertError says so.
"""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
from pathlib import Path

HOSTS = ("127.0.0.1", "localhost")


class CertError(RuntimeError):
    pass


def make_certs(folder: str | Path, hosts: tuple[str, ...] = HOSTS, backend: str | None = None
               ) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for `hosts` (IP addresses or DNS names), written to folder:
    (ca.pem, cert.pem, key.pem). Clients verify the server with ca.pem as their CA bundle.

    `backend`: "cryptography" or "openssl"; by default the package if it is installed, else the command."""
    if backend not in (None, "cryptography", "openssl"):
        raise CertError(f"unknown certificate backend {backend!r}; choose cryptography or openssl")
    if backend is None:
        try:
            import cryptography  # noqa: F401
        except ImportError:
            backend = "openssl"
        else:
            backend = "cryptography"
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "ca.pem", folder / "cert.pem", folder / "key.pem"
    if backend == "openssl":
        _with_openssl(folder, hosts, *paths)
    else:
        _with_cryptography(hosts, *paths)
    paths[2].chmod(0o600)
    return paths


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _with_cryptography(hosts: tuple[str, ...], ca_path: Path, cert_path: Path, key_path: Path) -> None:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    valid = dict(not_valid_before=now - datetime.timedelta(hours=1), not_valid_after=now + datetime.timedelta(days=1))

    def build(subject: str, issuer: str, public_key, signer, extensions):
        builder = x509.CertificateBuilder(
            subject_name=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]),
            issuer_name=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]),
            public_key=public_key, serial_number=x509.random_serial_number(), **valid)
        for ext, critical in extensions:
            builder = builder.add_extension(ext, critical=critical)
        return builder.sign(signer, hashes.SHA256())

    ca_name = "lambdasplit throwaway CA"
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = build(ca_name, ca_name, ca_key.public_key(), ca_key,
               [(x509.BasicConstraints(ca=True, path_length=None), True),
                (x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                               key_encipherment=False, data_encipherment=False, key_agreement=False,
                               encipher_only=False, decipher_only=False), True),
                (x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)])
    names = [x509.IPAddress(ipaddress.ip_address(h)) if _is_ip(h) else x509.DNSName(h) for h in hosts]
    cert = build(hosts[0], ca_name, key.public_key(), ca_key,
                 [(x509.SubjectAlternativeName(names), False),
                  (x509.BasicConstraints(ca=False, path_length=None), True),
                  (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
                  (x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False)])
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))


def _with_openssl(folder: Path, hosts: tuple[str, ...], ca_path: Path, cert_path: Path, key_path: Path) -> None:
    exe = shutil.which("openssl")
    if exe is None:
        raise CertError("making a throwaway certificate needs the 'cryptography' package (pip install cryptography) "
                        "or the openssl command (Debian: apt-get install openssl); neither was found")
    ca_key, csr, ext = folder / "ca.key", folder / "cert.csr", folder / "cert.ext"
    san = ",".join(f"IP:{h}" if _is_ip(h) else f"DNS:{h}" for h in hosts)
    ext.write_text(f"subjectAltName={san}\nbasicConstraints=critical,CA:FALSE\nextendedKeyUsage=serverAuth\n"
                   "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n")
    ec = ["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"]
    steps = [
        [exe, "genpkey", *ec, "-out", str(ca_key)],
        [exe, "req", "-x509", "-new", "-key", str(ca_key), "-subj", "/CN=lambdasplit throwaway CA", "-days", "1",
         "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
         "-out", str(ca_path)],
        [exe, "genpkey", *ec, "-out", str(key_path)],
        [exe, "req", "-new", "-key", str(key_path), "-subj", f"/CN={hosts[0]}", "-out", str(csr)],
        [exe, "x509", "-req", "-in", str(csr), "-CA", str(ca_path), "-CAkey", str(ca_key), "-CAcreateserial",
         "-days", "1", "-extfile", str(ext), "-out", str(cert_path)],
    ]
    try:
        for cmd in steps:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
            if done.returncode != 0:
                raise CertError(f"openssl {cmd[1]} failed: {done.stderr.strip()[-500:]}")
    finally:
        for leftover in (ca_key, csr, ext, folder / "ca.srl"):
            leftover.unlink(missing_ok=True)
