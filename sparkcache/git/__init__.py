"""Git mirrors: pygit2-managed bare repositories, served with ``git upload-pack``."""
