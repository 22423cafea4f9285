"""Throwaway certificates for the TLS tests: the ones ``tunkit bench tunnel`` makes too."""

from tunkit.cli.pki import Pki, make_pki

__all__ = ["Pki", "make_pki"]
