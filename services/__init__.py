"""The ASymPO services, one package per process."""
