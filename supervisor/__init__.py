"""ipsec-supervisor: crash-recovery supervisor for strongSwan's charon."""

__version__ = "0.1.0"
