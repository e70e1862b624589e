"""A store's password stays in the environment: never in a message, log, tag, flow-run parameter, printed
hint or command line.

Wherever a URI is shown, ``mask`` replaces its password with ``***``
(``postgresql+psycopg2://user:***@db:5432/mlflow``), as SQLAlchemy does; ``mask``
works on any text, so a message that quotes a URI is masked whole.

A masked URI is also how a password-protected store is passed around: `cnnflow run
--tracking-uri postgresql+psycopg2://user:PASSWORD@host/db` takes the password out
into $CNNCORE_TRACKING_PASSWORD (of its own process and its children) and gives the
flow the masked URI, which is what Prefect then records as the flow run's parameter.
``reveal`` puts the password back where the store is opened, from (in this order):

1. the URIs this process has opened or been given with their password (``remember``);
2. $CNNCORE_TRACKING_PASSWORD;
3. the file named by $CNNCORE_TRACKING_PASSWORD_FILE, which must be readable by its
   owner only (mode 600: a password readable by others is refused, not used);
4. $MLFLOW_TRACKING_URI, when it is the same URI with its password.

For a deployment or a script, give the flow the masked URI (or one without a password,
which libpq completes from PGPASSWORD or ~/.pgpass for Postgres) and set one of these
in the worker's environment. A flow called from Python with the password in its
argument still has Prefect record it: pass the masked URI there too.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit, urlunsplit

PASSWORD_ENV = "CNNCORE_TRACKING_PASSWORD"
PASSWORD_FILE_ENV = "CNNCORE_TRACKING_PASSWORD_FILE"
MASK = "***"

# scheme://user:password@ anywhere in a text; the password ends at the last @ before the host
# (a password may hold @, percent-encoded or not), and never spans whitespace, quotes or a slash.
_USERINFO = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s:/@'\"`]*:)(?P<password>[^\s/'\"`]*)@")

_known: dict[str, str] = {}


def mask(text: str) -> str:
    """text with the password of every URI in it replaced by ***."""
    if not text or "@" not in text:
        return text
    return _USERINFO.sub(lambda m: f"{m['head']}{MASK}@", text)


def password_of(uri: str) -> str | None:
    """The URI's password (percent-decoded), or None when it has none."""
    try:
        password = urlsplit(uri).password
    except ValueError:
        return None
    return None if password is None else unquote(password)


def is_masked(uri: str) -> bool:
    return password_of(uri) == MASK


def remember(uri: str) -> None:
    """Keep uri's password in this process, so that its masked form can be revealed later (a pipeline
    hands its subflows the masked URI of the store it opened)."""
    if password_of(uri) not in (None, MASK):
        _known[mask(uri)] = uri


def masked_for_flow(uri: str | None) -> str | None:
    """What to give a flow as its tracking_uri: the URI masked, its password remembered here and put in
    $CNNCORE_TRACKING_PASSWORD for the processes this one starts."""
    if uri is None or password_of(uri) in (None, MASK):
        return uri
    remember(uri)
    os.environ[PASSWORD_ENV] = password_of(uri)
    return mask(uri)


def reveal(uri: str) -> str:
    """uri with its masked password (***) put back (see the module's docstring); any other uri unchanged.

    Raises ValueError naming where it looked when a masked password is found nowhere,
    or when the password file is readable by others.
    """
    if not is_masked(uri):
        return uri
    if uri in _known:
        return _known[uri]
    password = os.environ.get(PASSWORD_ENV) or _password_from_file()
    if password is None:
        env_uri = os.environ.get("MLFLOW_TRACKING_URI", "")
        if mask(env_uri) == uri and not is_masked(env_uri):
            return env_uri
        raise ValueError(f"the store URI {uri} has its password masked, and none was found to put back: set "
                         f"${PASSWORD_ENV}, or ${PASSWORD_FILE_ENV} to a file readable by you only (chmod 600)")
    return with_password(uri, password)


def with_password(uri: str, password: str) -> str:
    parts = urlsplit(uri)
    host = parts.netloc.rpartition("@")[2]
    user = parts.netloc.rpartition("@")[0].partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:{quote(password, safe='')}@{host}"))


def without_password(uri: str) -> str:
    """uri with no password at all (user@host), for a command whose password comes from elsewhere."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    user, _, host = parts.netloc.rpartition("@")
    return urlunsplit(parts._replace(netloc=f"{user.partition(':')[0]}@{host}"))


def without_userinfo(uri: str) -> str:
    """uri with no user or password (host only): what a link for a browser shows."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def _password_from_file() -> str | None:
    name = os.environ.get(PASSWORD_FILE_ENV)
    if not name:
        return None
    path = Path(name).expanduser()
    try:
        mode = path.stat().st_mode
        if stat.S_IMODE(mode) & 0o077:
            raise ValueError(f"${PASSWORD_FILE_ENV} names {path}, which others can read (mode "
                             f"{stat.S_IMODE(mode):o}); make it yours alone with `chmod 600 {path}`")
        return path.read_text().strip()
    except OSError as exc:
        raise ValueError(f"${PASSWORD_FILE_ENV} names {path}, which cannot be read: {exc.strerror or exc}") from exc
