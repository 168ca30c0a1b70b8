"""sealvm: a KVM virtual machine monitor whose guests stay sealed from the host's management stack."""
__version__ = "0.1.0"
