"""PLACEHOLDER until the storage branch is merged."""


def is_uri(path: str) -> bool:
    return "://" in path
