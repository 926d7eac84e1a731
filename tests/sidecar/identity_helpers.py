"""A test signing authority for GCP-style identity tokens: an RSA key, its self-signed
certificate, and tokens shaped like the ones the GCE metadata server issues."""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from google.auth import crypt, jwt


class Authority:
    """Signs tokens with key ``kid``; ``certs()`` is what a certificate URL serves."""

    def __init__(self, kid: str = "key-1") -> None:
        self.kid = kid
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test-authority")])
        now = dt.datetime.now(dt.timezone.utc)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .sign(self.key, hashes.SHA256())
        )

    def certs(self) -> dict[str, str]:
        return {self.kid: self.cert.public_bytes(serialization.Encoding.PEM).decode()}

    def jwks(self) -> dict[str, Any]:
        numbers = self.key.public_key().public_numbers()

        def b64(n: int) -> str:
            import base64

            raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
            return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

        return {"keys": [{"kty": "RSA", "kid": self.kid, "n": b64(numbers.n), "e": b64(numbers.e)}]}

    def token(
        self,
        audience: str,
        instance_id: str = "4242424242",
        *,
        project: str = "proj-a",
        issued: float | None = None,
        lifetime: float = 3600,
        kid: str | None = None,
        **extra: Any,
    ) -> str:
        pem = self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        signer = crypt.RSASigner.from_string(pem, key_id=kid or self.kid)
        iat = int(issued if issued is not None else time.time())
        payload: dict[str, Any] = {
            "iss": "https://accounts.google.com",
            "aud": audience,
            "sub": "1234567890",
            "azp": "1234567890",
            "iat": iat,
            "exp": int(iat + lifetime),
            "google": {
                "compute_engine": {
                    "instance_id": instance_id,
                    "instance_name": "vm-1",
                    "project_id": project,
                    "project_number": 99,
                    "zone": "europe-west4-a",
                }
            },
        }
        payload.update(extra)
        return jwt.encode(signer, payload).decode()
