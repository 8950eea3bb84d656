"""OCI Distribution: pull-through mirrors (type oci) and local push repositories (type oci-local)."""
