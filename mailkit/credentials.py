"""Secrets at rest: Fernet tokens under a list of keys.

The first key encrypts; every key decrypts (MultiFernet), so a new key can be
put in front while rows written under the old one stay readable until
`rotate` re-encrypts them. Plain text never leaves this module except to the
caller that asked to decrypt.
"""
from cryptography.fernet import Fernet, InvalidToken, MultiFernet


class CredentialError(Exception):
    """A stored secret cannot be decrypted with the configured keys."""


def key_list(keys):
    """Keys from a comma-separated string or a list, newest first; at least one."""
    keys = [k.strip() for k in keys.split(',')] if isinstance(keys, str) else list(keys)
    if not keys or not all(keys):
        raise ValueError('at least one Fernet key is needed')
    return keys


class Sealer:
    """Encrypts under the newest key and offers nothing else: what a process that only stores secrets holds.

    (Fernet is symmetric, so the key material could decrypt; keeping decryption
    out of this class keeps it out of the code paths that hold one.)
    """

    def __init__(self, keys):
        self._fernet = Fernet(key_list(keys)[0])

    def encrypt(self, plain: str) -> str:
        return self._fernet.encrypt(plain.encode()).decode()

    def __repr__(self):
        return 'Sealer(<key hidden>)'


class Vault:
    """Decrypts with every key and re-encrypts under the newest: for the workers and key rotation."""

    def __init__(self, keys):
        self._fernet = MultiFernet([Fernet(k) for k in key_list(keys)])

    def decrypt(self, token: str) -> str:
        try:
            return self._fernet.decrypt(token.encode()).decode()
        except InvalidToken:
            raise CredentialError('stored secret does not decrypt with any configured key') from None

    def rotate(self, token: str) -> str:
        """The same secret encrypted under the newest key."""
        try:
            return self._fernet.rotate(token.encode()).decode()
        except InvalidToken:
            raise CredentialError('stored secret does not decrypt with any configured key') from None

    def __repr__(self):
        return 'Vault(<keys hidden>)'


def new_key() -> str:
    return Fernet.generate_key().decode()
