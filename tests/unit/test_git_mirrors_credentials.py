import pygit2
import pytest
from pygit2.enums import CredentialType

from sparkcache.git.config import GitCredentials
from sparkcache.git.credentials import MAX_ATTEMPTS, Callbacks, describe


def test_token_becomes_userpass() -> None:
    cb = Callbacks(GitCredentials(username="bot", token="t0k"))
    cred = cb.credentials("https://h/r.git", None, CredentialType.USERPASS_PLAINTEXT)
    assert isinstance(cred, pygit2.UserPass) and cred.credential_tuple == ("bot", "t0k")
    # a token without a username gets one GitHub and GitLab accept
    cred = Callbacks(GitCredentials(token="t0k")).credentials("https://h/r.git", None, CredentialType.USERPASS_PLAINTEXT)
    assert cred.credential_tuple[1] == "t0k" and cred.credential_tuple[0]


def test_ssh_key_becomes_keypair_with_the_url_user() -> None:
    creds = GitCredentials(ssh_key="/etc/key", ssh_public_key="/etc/key.pub", ssh_key_passphrase="pp")
    cred = Callbacks(creds).credentials("ssh://git@h/r.git", "git", CredentialType.SSH_KEY | CredentialType.USERNAME)
    assert isinstance(cred, pygit2.Keypair)
    assert cred.credential_tuple == ("git", "/etc/key.pub", "/etc/key", "pp")
    cred = Callbacks(creds).credentials("ssh://h/r.git", None, CredentialType.USERNAME)
    assert isinstance(cred, pygit2.Username)


def test_no_credentials_or_too_many_attempts_pass_through() -> None:
    with pytest.raises(pygit2.Passthrough):
        Callbacks(None).credentials("https://h/r.git", None, CredentialType.USERPASS_PLAINTEXT)
    cb = Callbacks(GitCredentials(token="wrong"))
    for _ in range(MAX_ATTEMPTS):
        cb.credentials("https://h/r.git", None, CredentialType.USERPASS_PLAINTEXT)
    with pytest.raises(pygit2.Passthrough):
        cb.credentials("https://h/r.git", None, CredentialType.USERPASS_PLAINTEXT)
    # a token cannot answer an SSH key request
    with pytest.raises(pygit2.Passthrough):
        Callbacks(GitCredentials(token="t")).credentials("ssh://h/r", "git", CredentialType.SSH_KEY)


def test_describe_never_shows_the_secret() -> None:
    assert describe(None) == "anonymous"
    assert describe(GitCredentials(token="s3cret")) == "token"
    assert describe(GitCredentials(ssh_key="/k", ssh_key_passphrase="s3cret")) == "ssh-key"
