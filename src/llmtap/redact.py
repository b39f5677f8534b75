"""Credentials out of everything llmtap writes: recorded URLs, error texts and its own log.

One rule for what a *name* says about its value, for query parameters and headers alike
(`is_secret_name`): the decoded name (`api%2Dkey` is `api-key`), normalized (case, and all
but letters and digits ignored: `apiKey`, `API_KEY`, `api-key`, `data[api_key]` are one name),
is a secret if it is a known credential name, ends in `key`, `token`, `secret`, `password`,
`signature`, `credential` or `sig`, holds `apikey`, or has a word such as `authorization`,
`auth`, `password`, `secret`, `token`, `key` or `cookie` anywhere (`helicone-auth`,
`x-ms-authorization-auxiliary`, `x-hub-signature-256`). `x-ratelimit-remaining-tokens` is not:
`tokens` is a count. A header is also a credential by its value (`is_secret_value`: `Bearer
...`, `sk-...`). Redacting too much costs a little debugging; too little leaks a key.

The log filter exists because aiohttp logs a malformed request (a control character in
`Authorization`, a raw non-ASCII byte in a query holding `?api-key=`) with a traceback that
quotes the raw request line or header, secret included. Such a request is the client's error,
not ours: it becomes one sanitized line. Every other record going through a filtered logger
or handler has credential-looking text masked.
"""

from __future__ import annotations

import binascii
import logging
import re
import traceback
from collections.abc import Collection
from urllib.parse import unquote_plus, urlsplit

import orjson

REDACTED = "***"
#: What a copy cut to a cap reads past it for redaction (longer than any credential): the rules
#: cost ~0.5 us a character, so a body is cut before it is redacted, not after (rev26: a 1.2 MB
#: prompt held `llmtap up`'s event loop 1.2 s in an OpenTelemetry span's content).
REDACT_MARGIN = 16 * 1024

#: Normalized (lowercase, no `-_.`) names of query parameters that carry secrets.
_SECRET_PARAMS = frozenset(
    {
        "key",
        "apikey",
        "token",
        "accesstoken",
        "refreshtoken",
        "idtoken",
        "authtoken",
        "sessiontoken",
        "sig",
        "signature",
        "password",
        "passwd",
        "pwd",
        "pass",
        "auth",
        "authorization",
        "secret",
        "clientsecret",
        "code",
        "credential",
        "credentials",
        "xamzcredential",
        "xamzsignature",
        "xamzsecuritytoken",
        "xgoogcredential",
        "xgoogsignature",
        "jwt",
        "bearer",
        "session",
        "sessionid",
        "jsessionid",  # Java's, as a path parameter (`;jsessionid=...`) as often as a cookie
        "phpsessid",
        "cookie",
        "xamznoidcdata",  # AWS ALB's signed assertion (its `-identity`, a user's id, is kept)
    }
)
_SECRET_SUFFIXES = ("key", "token", "secret", "password", "signature", "credential", "sig")
#: Words that mark a secret wherever they stand in a name split at `-`, `_`, `.`, brackets.
_SECRET_WORDS = frozenset(
    {
        "authorization",
        "authorisation",
        "auth",
        "authentication",
        "apikey",
        "apikeys",
        "key",
        "keys",
        "token",
        "password",
        "passwd",
        "passphrase",
        "pwd",
        "secret",
        "secrets",
        "credential",
        "credentials",
        "creds",
        "cookie",
        "cookies",
        "cookie2",
        "signature",
        "sig",
        "hmac",
        "sas",
        "jwt",
        "bearer",
    }
)
#: Words of a name: its runs of letters and digits (`-`, `_`, `.`, brackets, control bytes
#: and anything else between them are separators).
_WORD_SPLIT = re.compile(r"[^a-z0-9]+")


def _decoded(name: str) -> str:
    """The name as the upstream will read it: percent-decoding applied until stable (a proxy
    in between may decode once more), `+` as a space."""
    for _ in range(4):
        d = unquote_plus(name, errors="replace")
        if d == name:
            break
        name = d
    return name


def is_secret_name(name: str) -> bool:
    """True if a query parameter or header called `name` (as sent, possibly percent-encoded)
    looks like it carries a credential (the rule in the module's docstring)."""
    words = _WORD_SPLIT.split(_decoded(name).lower())
    n = "".join(words)
    if n in _SECRET_PARAMS or n.endswith(_SECRET_SUFFIXES) or "apikey" in n:
        return True
    return not _SECRET_WORDS.isdisjoint(words)


#: Authorization schemes (RFC 9110 §11) whose credentials follow them in a header value.
_AUTH_SCHEMES = frozenset(
    {"bearer", "basic", "digest", "token", "apikey", "negotiate", "hoba", "aws4-hmac-sha256"}
)
#: ... those whose credentials are parameters (spaces and commas between them).
_PARAM_SCHEMES = frozenset({"digest", "negotiate", "hoba", "aws4-hmac-sha256"})
#: Well-known key shapes, anywhere: OpenAI/Anthropic/DeepSeek `sk-...`, Google `AIza...`,
#: Groq `gsk_...`, Hugging Face `hf_...`, xAI `xai-...`, Perplexity `pplx-...`, Replicate `r8_...`,
#: the OpenAI-compatible NVIDIA `nvapi-...`, Cerebras `csk-...` and Fireworks `fw_...`; the
#: tokens a client's other tools carry (GitHub `ghp_...`/`github_pat_...`, GitLab `glpat-...`,
#: Slack `xoxb-...`, Stripe `sk_live_...`, AWS access key ids `AKIA...`); and signed JSON Web
#: Tokens (`eyJ...`: a front proxy's OIDC assertion about the user, each segment `=`-padded in
#: AWS ALB's `x-amzn-oidc-data`, rev29b); Google OAuth access
#: (`ya29.`) and refresh (`1//0`) tokens, SendGrid (`SG.`) and npm (`npm_`) keys.
#: A JWT's second segment is 16 KB at most: each `eyJ` of `-eyJ-eyJ...` reaches the same `.`, and
#: scanned an unbounded segment after it again (rev28b: 15 headers of 64 KB held the loop 400
#: ms); `_holds_key` also skips an `eyJ` inside a run a failed one read. The other `{n,}` fail
#: only short of their minimum, or end at a `.` (`SG.`), so each is linear.
#: A JWS (`header.payload.signature`, the payload empty when detached) or a JWE (five parts,
#: the second empty with `"alg":"dir"`, as NextAuth's session tokens: rev32 found them stored
#: whole); group 1 is the header.
_JWT_SHAPE = (
    r"(eyJ[A-Za-z0-9_\-]{8,1024}+)={0,2}\."
    r"(?:[A-Za-z0-9_\-]{8,16384}+={0,2}\.[A-Za-z0-9_\-]{0,16384}+={0,2}|\.[A-Za-z0-9_\-]{8,16384}+={0,2})"
    r"(?:\.[A-Za-z0-9_\-]{1,16384}+={0,2}\.[A-Za-z0-9_\-]{1,16384}+={0,2})?"  # a JWE's ciphertext, tag
)
#: A shape starts where no ASCII letter, digit or `_` stands before it: `\b` read as ASCII (in
#: Unicode, `令牌eyJ...`, `令牌sk-...` in an upstream's error text were kept; rev32).
_KEY_SHAPES = re.compile(
    r"\b(?:sk-[A-Za-z0-9_\-]{6,}|AIza[0-9A-Za-z_\-]{20,}"
    r"|(?:gsk_|hf_|xai-|pplx-|r8_|csk-|fw_|gh[pousr]_)[A-Za-z0-9]{20,}"
    r"|nvapi-[A-Za-z0-9_\-]{40,}|glpat-[A-Za-z0-9_\-]{20,}|github_pat_(?=[\w-]{0,96}\d)[A-Za-z0-9_]{40,}"
    r"|xox[abprse]-(?=[A-Za-z\-]{0,64}\d)[A-Za-z0-9\-]{10,}"
    r"|[sr]k_(?:live|test)_[A-Za-z0-9]{10,}|(?:AKIA|ASIA)[A-Z0-9]{16}\b"
    r"|" + _JWT_SHAPE.replace("(eyJ", "(?:eyJ", 1) + r"|ya29\.[\w-]{20,}|1//0[\w-]{20,}"
    r"|SG\.[\w-]{16,}\.[\w-]{16,}|npm_[A-Za-z0-9]{36})",
    re.ASCII,
)
#: What each key shape starts with, whole (`ghp_`, not `gh`, which English is full of).
_KEY_PREFIXES = (
    "sk-", "AIza", "gsk_", "hf_", "xai-", "pplx-", "r8_", "csk-", "fw_", "ghp_", "gho_", "ghu_",
    "ghs_", "ghr_", "github_pat_", "nvapi-", "glpat-", "xoxa-", "xoxb-", "xoxp-", "xoxr-", "xoxs-",
    "xoxe-", "sk_", "rk_", "AKIA", "ASIA", "eyJ", "ya29.", "1//0", "SG.", "npm_",
)  # fmt: skip
#: What a key shape starts with: the cheap test before the shapes.
_KEY_HINT = re.compile("|".join(re.escape(p) for p in _KEY_PREFIXES))
#: The same for a header's name, lowercased (Go and Python's urllib send `Llmtap-Property-Sk-Proj-...`):
#: case-sensitive patterns keep the hints' fast literal search, which `re.IGNORECASE` lost (rev30b:
#: 20 names of 32 KB took 300 ms). An AWS key id is read in its case only, by `_AWS_HINT` and the
#: shapes (rev30b: `AsiaPacificRevenue01` is a name).
_AWS_SHAPE = r"|(?:AKIA|ASIA)[A-Z0-9]{16}\b"
_AWS_PREFIXES = ("AKIA", "ASIA")
_KEY_HINT_LOWER = re.compile("|".join(re.escape(p.lower()) for p in _KEY_PREFIXES if p not in _AWS_PREFIXES))
#: In a name, where case is lost, two shapes read as keys are issued: a Google key is `AIza` and
#: 35 more, a digit among them, a JWT's header 18 characters at least (`{"typ":"JWT"}`):
#: `Aizawl-District-Office-Code` and `Eyjafjallajokull.eruption.2010` are names (stop 56: both
#: were masked).
_KEY_SHAPES_LOWER = re.compile(
    _KEY_SHAPES.pattern.replace(_AWS_SHAPE, "")
    .replace(r"AIza[0-9A-Za-z_\-]{20,}", r"AIza(?=[\w-]{0,34}\d)[0-9A-Za-z_\-]{35,}")
    .replace(r"eyJ[A-Za-z0-9_\-]{8,1024}+", r"eyJ[A-Za-z0-9_\-]{15,1024}+")
    .lower(),
    re.ASCII,
)
_AWS_HINT = re.compile("|".join(_AWS_PREFIXES))
#: A name's characters `masked_name` reads: a property name is cut to 128 bytes, and a key the
#: cut splits is seen whole this far past it (`limits.MASK_MARGIN`).
_NAME_READ = 128 + 1024
#: Hints read per value at most: a value made of hundreds of them (`xoxb-xoxb-...`) is taken
#: for a credential rather than read on (each costs a match; 8 KB of them held the loop 3 ms).
_HINTS_READ = 64


def _secret_userinfo(userinfo: str) -> bool:
    if ":" in userinfo or "%3a" in userinfo.lower():
        return True
    return len(userinfo) >= 16 and "." not in userinfo and any(c.isdigit() for c in userinfo)


#: Prose after a scheme's name: two or more words of letters, lowercase or Title-case (`Bearer
#: market outlook`, `Bearer Market Outlook`; rev28b: the second was dropped). A digit, a comma or
#: an `=` makes it a credential still (`Bearer t1, Bearer t2`, `Token token=t, user=bob`).
_PROSE = re.compile(r"[A-Za-z][a-z]+(?: [A-Za-z][a-z]+)+")
#: What a parameter scheme's credential holds that prose does not: Digest's and AWS4's `name=`
#: parameters and commas, Negotiate's and HOBA's base64 token (16 characters or more).
_PARAM_CREDENTIAL = re.compile(r"[=,]|[A-Za-z0-9+/_-]{16}")


def _one_credential(scheme: str, cred: str) -> bool:
    """Anything after the scheme but prose, and for `Basic` a word of letters too (`Basic plan`:
    all but never base64 of a secret; rev26: such headers were dropped). More than one token is
    still a credential (rev27: `Bearer t1, Bearer t2` as a proxy merges them, `Token token=t,
    user=bob` as Rails sends it, were recorded whole)."""
    if _PROSE.fullmatch(cred) is not None:
        return False
    if scheme in _PARAM_SCHEMES:  # `Digest weekly summary`, `HOBA tree`: no parameter, no token
        return _PARAM_CREDENTIAL.search(cred) is not None
    return scheme != "basic" or not (cred.isalpha() and (cred.islower() or cred.istitle()))


#: A challenge's `name=value` or `name="value"` parameter (a token68's `=` ends it: `abc==`).
_CHALLENGE_PARAM = re.compile(r'[A-Za-z][\w-]*\s*=\s*(?:"|[^=\s,])')


#: A challenge's comma-separated items, quoted strings whole.
_CHALLENGE_ITEM = re.compile(r'(?:[^,"]|"(?:[^"\\]|\\.)*"?)+')


def _challenge_credential(value: str) -> bool:
    """A credential among a challenge's parameters (rev34: one parameter kept the whole value,
    `Bearer <token>, error="invalid_token"` and `Basic <b64>, realm="x"` too): an item that is a
    scheme and its token, a bare token68 of 16 characters, or a parameter named like a secret
    (`token=`)."""
    for item in _CHALLENGE_ITEM.findall(value):
        scheme, _, rest = item.strip().partition(" ")
        rest = rest.strip()
        if _CHALLENGE_PARAM.match(item.strip()) is not None:
            rest = item.strip()  # a parameter of the scheme before it
        elif not rest:  # a bare token68 (a scheme alone is none)
            if len(scheme) >= 16 and scheme.lower() not in _AUTH_SCHEMES:
                return True
            continue
        if _CHALLENGE_PARAM.match(rest) is None:  # `<scheme> <token>`
            if is_secret_value(item.strip()):
                return True
        elif is_secret_name(rest[: rest.index("=")].strip()):  # `token=...`
            return True
    return False


def is_secret_value(value: str, challenge: bool = False) -> bool:
    """True for a header value that reads as a credential whatever the header is called:
    `<auth scheme> <credentials>` (`Bearer ...`, `Basic ...`) or a well-known key shape.
    Called for every recorded header of every request, so a split and a set lookup, not a
    regex, for the common value. A `challenge` (an answer's `WWW-Authenticate: Bearer
    realm="api", error="invalid_token"`) names a scheme before parameters that are no
    credential: there only a token after the scheme (no `name=value`), a key or a URL's
    password is one (rev33: `Bearer <token>` in it was kept)."""
    sp = value.find(" ")
    if "\t" in value:  # any whitespace separates a scheme (rev26: `Bearer\t...`)
        tab = value.find("\t")
        sp = tab if sp < 0 or tab < sp else sp
    if challenge and _CHALLENGE_PARAM.search(value, sp + 1) is not None:
        if _challenge_credential(value):
            return True
        sp = -1
    if 0 < sp < 17 and (scheme := value[:sp].lower()) in _AUTH_SCHEMES and (cred := value[sp + 1 :].strip()):
        if _one_credential(scheme, cred):
            return True
    # A key or a URL's password anywhere in the value (rev23: `x-portkey-config: {"api_key":
    # "sk-..."}`, `x-note: key sk-...`, `x-route: https://u:pw@host` were recorded and served
    # whole). One search for what starts any of them first (0.4 us a value at C speed, where a
    # test per prefix cost 1.5): most values hold none.
    # The shapes are tried only where a hint stands, anchored there: a search for them
    # anywhere tried every alternative at every character (3 ms an 8 KB value; rev24).
    if "@" in value:
        # A URL's userinfo: one C-level search from each `://` to the `@` ending it, not a match
        # per `://` hint (rev26: 64 KB of `://` held the loop 40 ms, each hint testing the whole
        # value for an `@`). Matches are as many as the `@`s at most, and bounded like hints.
        for i, u in enumerate(_URL_USERINFO.finditer(value)):
            if i >= _HINTS_READ or _secret_userinfo(u[1]):
                return True
        if "://" in value and _url_password(value):
            return True
    return _holds_key(value)


#: Hints inside words skipped per value at most (`task_1,task_2...`: a list of them is no key;
#: 64 KB of `sk_` took 25 ms, rev27).
_INSIDE_READ = 1024


#: A JWT as `_KEY_SHAPES` reads one, without what stands before it: for one right after a word
#: character (`u_<jwt>`, `sess_<jwt>`), where its header (group 1) must be a JWT's too.
_JWT = re.compile(_JWT_SHAPE)
#: ... and in a name, its case lost, one whose header begins as a JWT's does (`{"alg":`,
#: `{"typ":`, `{"kid":`, `{"enc":`, `{"cty":`, `{"x5t":`, `{"jku":`, `{"zip":`, `{"crit":`,
#: base64, lowercased): `turkeyjerky-flavour-catalogue.smokehouse-edition.v3` is a name (rev34).
_JWT_LOWER = re.compile(
    _JWT_SHAPE.replace(
        "(eyJ[A-Za-z0-9_\\-]{8,1024}+)",
        "(eyJ(?=hbgcio|0exaio|rawqio|lbmmio|jdhkio|4nxqio|qa3uio|6axaio|jcml0i)[A-Za-z0-9_\\-]{15,1024}+)",
        1,
    ).lower()
)
#: An `eyJ` right after a word character with 8 more of a header's (the fewest a JWT's has),
#: as `redact_text` looks for one: a C-level search skips the `xeyJ.` a Python loop would try.
#: (The literal first, then the look back: a pattern starting with a look-behind is tried at
#: every character, 3-5 ms over the README, not searched for its literal.)
_JWT_IN_WORD = re.compile(r"eyJ(?<=[A-Za-z0-9_]eyJ)[A-Za-z0-9_\-]{8}")


def _jwt_header(segment: str) -> bool:
    """The first segment of a JWT glued to a word is a JWT's header: base64 of a JSON object
    naming its `alg`. Ending in `}` was not enough (rev32: one segment in 256 does, and
    `honeyJarsEuRegion2.internal.example` was masked)."""
    try:
        head = binascii.a2b_base64(
            segment.replace("-", "+").replace("_", "/") + "=" * (-len(segment) % 4), strict_mode=True
        )
        obj = orjson.loads(head)
    except (binascii.Error, ValueError):  # (orjson's error is a ValueError)
        return False
    return isinstance(obj, dict) and "alg" in obj


def _holds_key(
    value: str,
    hints: re.Pattern[str] = _KEY_HINT,
    shapes: re.Pattern[str] = _KEY_SHAPES,
    sk_start: bool = True,
) -> bool:
    """A key shape anywhere in `value`, tried where its start stands (`sk_start`: an `sk-` word
    starting `value` is a key at any length, as a header's value is; not a name's)."""
    n = inside = skip = jwts = 0
    lower = shapes is not _KEY_SHAPES
    failed = -1  # where the header of the last glued shape that did not decode ends
    for hint in hints.finditer(value):
        at = hint.start()
        eyj = hint[0] == "eyJ" or hint[0] == "eyj"
        prev = value[at - 1] if at else ""
        escaped = False
        if prev.isascii() and (prev.isalnum() or prev == "_") and not lower:
            # after an escape (`%20sk-...`, `\nsk-...`) a key starts where a word seems to go on
            escaped = _ESCAPE_BEFORE.search(value, max(at - 6, 0), at) is not None
        if (eyj and at < skip) or (not escaped and prev.isascii() and (prev.isalnum() or prev == "_")):
            # inside a word (`task_1`): no shape starts there; an `eyJ` inside a run a failed one
            # read reaches the same `.` and rest (only an `eyJ`: `eyJx-sk-proj-...` holds a key)
            if eyj and at >= skip:  # a JWT glued to a word (`u_<jwt>`)
                if lower:  # a name, its case lost: the shape with a header of 18 (rev33)
                    if _JWT_LOWER.match(value, at) is not None:
                        return True
                    skip = _past_failed_jwt(value, at)
                elif at < failed:  # in the header of one that did not decode: the same rest
                    jwts += 1
                    if failed - at >= 11 and (jwts > _HINTS_READ or _jwt_header(value[at:failed])):
                        return True
                elif (m := _JWT.match(value, at)) is None:
                    skip = _past_failed_jwt(value, at)
                else:
                    jwts += 1  # past `_HINTS_READ` of them, the shape alone decides
                    if jwts > _HINTS_READ or _jwt_header(m[1]):
                        return True
                    failed = m.end(1)
            inside += 1
            if inside > _INSIDE_READ:
                return True
            continue
        n += 1
        if n > _HINTS_READ:
            return True
        m = (_KEY_SHAPES_AFTER if escaped else shapes).match(value, at)
        # `sk-` inside a value is a key at 24 characters or more, as every provider's is: a
        # word such as `sk-hynix-earnings-q3` in a referer is not (rev24).
        if m is not None and (
            (sk_start and m.start() == 0)
            or m[0][:3] != "sk-"
            # a name's `sk-` word holds a digit too, as every provider's keys do: case is lost
            # there, and `Sk-Learn-Pipeline-Version` is a name (stop 56: masked)
            or (len(m[0]) >= 24 and (sk_start or any(c.isdigit() for c in m[0])))
        ):
            return True
        if m is None and eyj:
            skip = _past_failed_jwt(value, at)
    return False


def masked_value(value: str) -> str:
    """A user id, session id or property value as recorded: `***` when it reads as a credential
    (rev26: `Llmtap-Property-Apikey: sk-proj-...` was stored and served whole)."""
    return REDACTED if is_secret_value(value) else value


def masked_name(name: str) -> str:
    """A property's name as recorded: `***` when it holds a key (rev29b: the gateway's
    `Llmtap-Property-sk-proj-...: 1` and ingest's `properties={key: "1"}` were stored). The one
    rule for both: a name is no value, so only a key's shape tells (`token_count` is a name), in
    any case (a header name's case is not the client's: urllib and Go send `Sk-Proj-...`), and
    as inside a value: `sk-` from 24 characters (`Sk-Learn-Version` is a name), an AWS key id
    in its case only (`AsiaPacificRevenue01` is one too; rev30b)."""
    head = name[:_NAME_READ]
    low = head.lower()
    if _holds_key(low, _KEY_HINT_LOWER, _KEY_SHAPES_LOWER, sk_start=False):
        return REDACTED
    if ("akia" in low or "asia" in low) and any(_aws_id(m[0]) for m in _AWS_ANY_CASE.finditer(head)):
        return REDACTED
    return name


#: An AWS key id's shape in any case, read only where `akia`/`asia` is (`masked_name`).
_AWS_ANY_CASE = re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b", re.IGNORECASE | re.ASCII)


def _aws_id(word: str) -> bool:
    """An AWS key id as a header name carries it: as issued (upper case), or as clients recase
    a header's name: lower case (urllib), the first letter up (Go), with a digit past the
    prefix (rev31: `Llmtap-Property-akiaiosfodnn7example` was stored); not a name in mixed case
    (`AsiaPacificRevenue01`)."""
    rest = word[1:]
    # issued upper-case, whatever it holds: base32, and one in 28 has no digit (rev32: such an
    # id was stored as a property's name); recased, a digit tells it from a word
    return word.isupper() or (rest.islower() and any(c.isdigit() for c in word[4:]))


def key_in_header_name(name: str) -> bool:
    """A header's name that must not be recorded: one holding a key (`masked_name`), or one
    longer than that reads, which only a name holding something else than a name is (header
    names are never cut; rev31: a key 1,200 characters in was recorded)."""
    return len(name) > _NAME_READ or masked_name(name) != name


def distinct_name(name: str, taken: Collection[str]) -> str:
    """`name`, or for a name `***` or `***<n>` (masked, or sent so) one not in `taken` yet: two
    names masked are two properties, not one whose other value is lost (rev30b: two keys as
    names were stored as one `***`; rev31: a `***2` sent overwrote the second key's). `taken`
    only grows, and every such name in it came from here, numbered at most its size then: the
    next size plus one is free, so a request of 1,000 such names is no quadratic search
    (rev31: 180 ms)."""
    if not name.startswith(REDACTED) or (name != REDACTED and not name[3:].isdigit()):
        return name
    if REDACTED not in taken:
        return REDACTED
    second = REDACTED + "2"
    return second if second not in taken else f"{REDACTED}{len(taken) + 1}"


#: Headers whose `Bearer realm="..."` is a challenge, not a credential: an upstream's 401
#: says there why it refused (`error="invalid_token"`), and it was dropped as `Bearer ...`.
CHALLENGES = frozenset({"www-authenticate", "proxy-authenticate"})


def is_secret_header(name: str, value: str, answer: bool = False) -> bool:
    """A header that must not be recorded: named like a credential, or valued like one (an
    `answer`'s challenge as `is_secret_value` reads one: a request's is no challenge)."""
    return is_secret_name(name) or is_secret_value(value, answer and name.lower() in CHALLENGES)


#: Parameters of one query read one by one at most; the rest are all masked, names too
#: (rev26: 1 MB of `a=%25&` held the loop 3 s, a name rule and a text scan a pair).
_PAIRS_READ = 1000
_SEPARATOR = re.compile(r"[&;]")
#: A parameter past `_PAIRS_READ`: its name and value masked (junk by then, and a key may be
#: either: rev28b showed `sk-...=1` and a secret's rest after a `;` as names), a piece with no
#: `=` (a `;` inside the last secret read: rev27 showed `token=***;Rest0fTheSecret`) whole.
_PAST_CAP = re.compile(r"(?<=[&;])([^&;=]*)(=)?[^&;]*")
#: Characters of decoded values one query has scanned for secrets (`redact_text`) at most: past
#: them a value that needs a scan is masked unread, as past the cap (rev28b: 4 values of 16 KB
#: held the loop 135 ms).
_QUERY_SCAN = 32 * 1024


def _past_cap(m: re.Match[str]) -> str:
    return f"{REDACTED}={REDACTED}" if m[2] else (REDACTED if m[0] else "")


def _report(masked: list[str] | None, value: str) -> None:
    """`value` (a masked one) raw, decoded once and decoded to the end, for `masked`: what an
    upstream echoing the URL may quote (`capture._credentials`)."""
    if masked is not None:
        masked += {value, unquote_plus(value, errors="replace"), _decoded(value)}


def redact_query(query: str, masked: list[str] | None = None) -> str:
    """A query string with the values of credential-looking parameters replaced by `***`, and
    a name or a piece with no `=` that holds a key. `&` and `;` both separate parameters (some
    servers accept either). What is masked goes to `masked` too, when given: the one rule for
    what the record hides and what an upstream's error answer must not show."""
    tail = ""
    if query.count("&") + query.count(";") >= _PAIRS_READ:
        for i, m in enumerate(_SEPARATOR.finditer(query)):
            if i == _PAIRS_READ - 1:
                query, rest = query[: m.start()], query[m.start() :]
                tail = _PAST_CAP.sub(_past_cap, rest)
                if masked is not None:  # the whole, as it is echoed, and any key in it
                    _report(masked, rest[1:])
                    for piece in _SPLIT_PARAMS.split(rest):
                        for v in piece.split("="):
                            if _holds_key(v):
                                _report(masked, v)
                break
    out: list[str] = []
    changed = masking = False
    left = [_QUERY_SCAN]
    names: dict[str, tuple[bool, bool]] = {}  # one name rule per distinct name (`a=1&a=2&...`)
    for part in _SPLIT_PARAMS.split(query):
        if part in ("&", ";"):
            out.append(part)
            continue
        name, sep, value = part.partition("=")
        if not sep and part and _holds_secret(part, left):
            # a key on its own (`?sk-...`, `#sk-...`; rev28b: stored whole)
            out.append(REDACTED)
            _report(masked, part)
            changed = masking = True
            continue
        secret = key_name = False
        if sep:
            known = names.get(name)
            if known is None:  # a name that is a key (`?sk-...=1`; rev28b) is masked itself
                # (one search for a key's start first: most names hold none, and this is per request)
                key = ("%" in name or _KEY_HINT.search(name) is not None) and _holds_secret(name, left)
                known = names[name] = (is_secret_name(name), key)
            key_name = known[1]
            secret = bool(value) and (known[0] or key_name or _holds_secret(value, left))
        if secret or key_name:
            out.append(f"{REDACTED if key_name else name}={REDACTED if secret else value}")
            if key_name:
                _report(masked, name)
            if secret:
                _report(masked, value)
            changed = masking = True
        elif masking and out[-1] == ";" and (not value.strip("=") if sep else "/" not in part):
            # No `name=` after a `;` that follows a secret (a `/`: a path goes on), or one with
            # nothing but `=` after it (base64's padding): the secret's own rest, for a reader
            # that splits at `&` only (rev23: `?token=ab;cd`, Python's own `parse_qs`, showed
            # `cd`; rev26: `token=ab;cd==`, `sig=AbC;dE/fG==`). `;charset=utf-8` is kept.
            out.append(REDACTED)
            _report(masked, part)
        else:
            out.append(part)
            masking = False
    return "".join(out) + tail if changed else query + tail


_SPLIT_PARAMS = re.compile(r"([&;])")
#: What a decoded value needs for `redact_text` to find anything in it: a pair, a header line,
#: a userinfo, an auth scheme or a key shape's start.
_MAY_HOLD = re.compile(r"[=:@]|(?i:bearer|basic)\s|" + "|".join(re.escape(p) for p in _KEY_PREFIXES))


def _holds_secret(value: str, left: list[int] | None = None) -> bool:
    """A parameter value that holds a key as it is, or is itself an encoded URL or query with
    a secret in it (`redirect=https%3A%2F%2Fx%3Fkey%3D...`). `left`: the characters the query
    may still scan (`_QUERY_SCAN`)."""
    if "%" in value and len(value) > REDACT_MARGIN:  # longer than any URL or key: unread (rev27)
        return True
    # as it is (rev27: `?x=sk-proj-...` was kept), and before decoding: `sk-...%zz` decodes to
    # itself (rev28b: it was kept)
    if _holds_key(value):
        return True
    if "%" not in value:
        return False
    d = _decoded(value)
    # a full text scan only where one could find something (rev26: `a=%25` a pair, 3 s a MB)
    if d == value or _MAY_HOLD.search(d) is None:
        return False
    if left is not None:
        left[0] -= len(d)
        if left[0] < 0:
            return True
    return redact_text(d) != d


def redact_url(url: str, masked: list[str] | None = None) -> str:
    """The URL with its password (`scheme://user:***@host`) and the values of credential-looking
    query parameters replaced by `***`: for recorded upstream URLs, banners and messages.

    Never raises (it is used in error messages). The common URL, with neither `@` nor `?`,
    costs two `in` tests: the record builder calls this for every request.
    """
    if "@" in url:
        try:
            netloc = urlsplit(url).netloc
        except ValueError:  # unparsable: show no userinfo at all rather than guess where it ends
            scheme, sep, rest = url.partition("://")
            return f"{scheme}://***@{rest.rsplit('@', 1)[-1]}" if sep and "@" in rest else url
        if "@" in netloc:  # the userinfo as the URL's parser reads it, spaces and all (rev19)
            userinfo, _, host = netloc.rpartition("@")
            user, colon, _ = userinfo.partition(":")
            if netloc in url:
                url = url.replace(netloc, f"{user}:{REDACTED}@{host}" if colon else f"{REDACTED}@{host}", 1)
            else:  # the parser dropped a tab or line end the URL holds (rev20): up to its `@`
                scheme, _, rest = url.partition("://")
                url = f"{scheme}://{REDACTED}@{rest.rsplit('@', 1)[-1]}"
        url = _USERINFO.sub(_hide_password, url)
    if "?" not in url and ";" not in url and "#" not in url:
        return url
    # Path parameters (`/models;key=...`), the query and the fragment: each `name=value` pair
    # under the same rule (`redact_query` splits at `&` and `;`, so `;` pairs in the path too).
    head, hsep, frag = url.partition("#")
    path, qsep, query = head.partition("?")
    # `masked`: every value the query rule masks, for `capture._credentials`.
    path, psep, params = path.partition(";")
    red = [path, psep, redact_query(params, masked) if psep else ""]
    red += [qsep, redact_query(query, masked) if qsep else ""]
    red += [hsep, redact_query(frag, masked) if hsep else ""]
    return "".join(red)


def redact_dsn(url: str) -> str:
    """A backend URL (queue, store) as `redact_url` shows it, but with everything between `://`
    and its *last* `@` taken for the userinfo: a password holding a raw `@`, `/`, `?` or `#`
    (which drivers read each their own way) showed its tail through the URL rules. Only for
    settings: a target URL's path may hold an `@` (`claude-3-5-sonnet@20240620` on Vertex)."""
    scheme, sep, rest = url.partition("://")
    if not sep and "@" in url:
        # No `//` (`user:pass@host:8080`, `postgresql:/u:p@h`, `https:u:p@h`): no parser finds
        # a userinfo, so all up to the last `@` is hidden (rev21: these were printed whole).
        return f"{REDACTED}@{redact_url(url.rpartition('@')[2])}"
    if not sep or "@" not in rest:
        return redact_url(url)
    # Where the userinfo ends: the last `@` before the first `?` or `#` (a password may hold
    # `/` and `@`). With none there, the first `@` after it: the query's when a `name=` comes
    # first (`?password=a@b`: the query's own rule masks it), else the password's, which holds
    # the `?` or `#` (`u:s3cr/et?x@host`). When neither reading can be told, all is hidden.
    q = min((i for i in (rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    at = rest.rfind("@", 0, q)
    if at < 0:
        at = rest.find("@", q)
        # a `name=value` first, in the same query or fragment: the `@` is a value's (rev26:
        # `?x=1#Qx7@Zk9`, a fragment holding a password after a query, was shown whole)
        if "=" in rest[max(rest.rfind("?", 0, at), rest.rfind("#", 0, at)) : at]:
            if ":" in rest[:q].partition("/")[0]:
                # `u:a?b=c@h`, `u:2024/b?password=d@h`: a password, or a host and its port? Not
                # told: all of it hidden, `h:5432/db?password=a@b` too (rev23-rev25: each reading
                # a query rule masks showed the password's head).
                return f"{scheme}://{REDACTED}"
            return redact_url(url)
    hidden = False
    later = rest.find("@", q) if at < q else -1
    if later >= 0:
        # `@`s on both sides of the `?` or `#` (a user name holding an `@`, rev26:
        # `app@corp.com:Qx7?Zk9@h` showed `Qx7?Zk9`): with no `name=` before the later one it
        # is no query value's, so all up to the last `@` is the userinfo; with one, and no port
        # but a word before the `?` (`corp.com:Qx7?a=Zk9@h`), no telling: all hidden.
        _, colon, port = rest[at + 1 : q].partition("/")[0].rpartition("]")[2].rpartition(":")
        if "=" not in rest[q:later]:
            at, hidden = rest.rfind("@"), True
        elif colon and not port.isdigit():
            return f"{scheme}://{REDACTED}"
    userinfo, host = rest[:at], rest[at + 1 :]
    user, colon, _ = userinfo.partition(":")
    if hidden:
        user, colon = "", ""  # all of it one userinfo
    elif any(c in user for c in "/?#"):
        user = ""  # no telling where the user name ends
    # `user:***`, `:***` (a password alone); no `:` at all: a token on its own, all hidden
    return redact_url(f"{scheme}://{user + ':' if colon else ''}{REDACTED}@{host}")


#: A URL path segment that is a secret, not a name: 16 or more letters, digits, `-` or `_`
#: with letters and digits both, or any 24 or more (Slack's `/services/T…/B…/<24 characters>`,
#: Discord's `/api/webhooks/<id>/<68 characters>`, a UUID); `hooks`, an all-digit id are kept.
_TOKEN_SEGMENT = re.compile(r"(?=[\w-]*\d)(?=[\w-]*[A-Za-z])[\w-]{16,}|[\w-]{24,}", re.ASCII)


def redact_webhook_url(url: str) -> str:
    """A webhook endpoint's URL as listed and logged: `redact_url`, and path segments that look
    like tokens shown as `***` (for Slack or Discord incoming webhooks the path is the
    credential). Never raises."""
    red = redact_url(url)
    scheme, sep, rest = red.partition("://")
    host, slash, tail = rest.partition("/")
    if not sep or not slash:
        return red
    path, qsep, query = tail.partition("?")
    masked = "/".join("***" if _TOKEN_SEGMENT.fullmatch(seg) else seg for seg in path.split("/"))
    return f"{scheme}://{host}/{masked}{qsep}{query}"


#: `scheme://userinfo@` anywhere in a text (a URL inside a query value or a list too).
#: Schemes of at most 32 characters: unbounded, each word start of a long `a-a-a-...` run
#: scanned to the run's end (rev24: 8 KB of it held the loop 0.26 s, 64 KB 16 s).
_USERINFO = re.compile(r"(?i)(?P<head>\b[a-z][a-z0-9+.-]{0,31}://)(?P<userinfo>[^/@\s?#]+)@")
#: A URL's userinfo in a header value, right after its `://`, up to what ends a URL in running
#: text (`<>"`, a space): a password (`user:pw@`, `u%3Apw@`) or a token alone (16+ characters,
#: a digit, no dot: no host) is a credential; `git@`, `<https://x>, <mailto:a@b>` are not
#: (rev24, rev25: `u:pa;ss@` and `<32 hex>@` were let through).
_URL_USERINFO = re.compile(r"://([^/@\s?#<>\"]*)@")


#: `://user:` with what follows the `:` no port: a password, which may hold a `/`, `?` or `#`
#: (rev28b: `postgresql://app:s3cr/etPw99@db`, `redis://:Zk9#Qx7@h` were recorded whole), when an
#: `@` follows in the same URL (as `redact_dsn` reads it). A port follows a host (`://:` starts
#: an empty user's password, but in `://://`) and ends at a `/` or the URL's end: digits then a
#: `?` or `#` are a password's (rev29b: `redis://:2024/Qx7pw@h`, `https://svc:42?Pa55w0rd@api`).
#: An IPv6 host's brackets are skipped for its `:`s (rev29b: `http://[::1]:8080/m/claude@2024`).
_URL_PASSWORD = re.compile(
    r'://(?::(?!//)|(?:\[[^\]/?#@\s<>"]*\][^/?#@:\[\s<>"]*|[^/?#@:\[\s<>"]+):(?!\d*(?:[/\s<>"]|$)))'
)
#: What ends a URL in running text.
_URL_END = re.compile(r'[\s<>"]')


def _url_password(value: str) -> bool:
    """A URL's `user:password@` in `value` whose password holds a `/`, `?` or `#`. Each run to
    the URL's end is searched once, whatever the number of `://` in it, and 64 of them read."""
    end = at = -1
    for i, m in enumerate(_URL_PASSWORD.finditer(value)):
        if i >= _HINTS_READ:
            return True
        if m.end() > end:  # a URL not searched yet: its end, and its last `@`
            e = _URL_END.search(value, m.end())
            end = e.start() if e else len(value)
            at = value.rfind("@", m.end(), end)
        if at >= m.end():
            return True
    return False


def _hide_password(m: re.Match[str]) -> str:
    """`user:***@`; userinfo with no `:` may be a token on its own (`https://TOKEN@host`,
    `u%3Apass@`), so all of it is hidden then."""
    user, colon, _ = m["userinfo"].partition(":")
    return f"{m['head']}{user}:{REDACTED}@" if colon else f"{m['head']}{REDACTED}@"


# -- free text (error messages, log lines) ---------------------------------------------------------

#: `name=value` pairs in a URL or a form, wherever they appear in a text. Each name pattern
#: starts only where a run of name characters starts (the lookbehind): otherwise every position
#: inside a long run (a body's text) would scan to the run's end again, quadratic time.
#: Brackets belong to a name (`data[api_key]=`, PHP and Rails style), as in `is_secret_name`.
_PAIR = re.compile(r"(?<![^\s?&;=#'\"<>(){},])(?P<name>[^\s?&;=#'\"<>(){},]+)=(?P<value>[^\s&;#'\"<>]*)")
#: Header-like `Name: value` lines and `Bearer <token>`/`Basic <creds>` wherever they are.
_HEADER = re.compile(
    r"(?im)(?<![\w.-])(?P<name>[\w.-]*?(?:authorization|auth|key|token|secret|cookie|password|signature))"
    r"(?P<sep>\s*:\s*)(?P<value>[^\r\n'\"]+)"
)
_SCHEME = re.compile(r"(?i)\b(?P<scheme>bearer|basic)(?P<sp>\s+)(?P<value>[^\s'\",;]+)")


def _pair(m: re.Match[str]) -> str:
    return f"{m['name']}={REDACTED}" if m["value"] and is_secret_name(m["name"]) else m.group()


def _glued_jwts(text: str) -> str:
    """`text` with the JWTs right after a word character masked (`sess_<jwt>`; `_KEY_SHAPES`
    takes those at a word's start). Each run of an `eyJ` that failed is read once, as in
    `_holds_key`; past `_HINTS_READ` headers that did not decode, the shape alone decides."""
    if "eyJ" not in text:
        return text
    out: list[str] = []
    last = pos = tried = 0
    failed: re.Match[str] | None = None  # the last shape whose header did not decode
    while (hint := _JWT_IN_WORD.search(text, pos)) is not None:
        at = hint.start()
        if failed is not None and at < failed.end(1):
            m = failed  # a later `eyJ` of its header reaches the same rest: its own header only
            header = text[at : m.end(1)]
            if len(header) < 11:  # (`eyJ` and 8, the fewest a header has)
                pos = at + 1
                continue
        else:
            found = _JWT.match(text, at)
            if found is None:
                pos = _past_failed_jwt(text, at)
                continue
            m, header = found, found[1]
        tried += 1
        if tried > _HINTS_READ or _jwt_header(header):
            out += (text[last:at], REDACTED)
            last = pos = m.end()
            failed = None
        else:
            failed, pos = m, at + 1
    return "".join(out) + text[last:] if out else text


#: A JSON escape right before what starts a key (`\nsk-...`, `\u724csk-...` as `json.dumps`
#: writes text): the escape's letter or hex digit is no word the key is glued to (rev33:
#: such keys in a webhook's body were kept). The literal first, so it is searched for.
_ESCAPE = r"(?:\\(?:[nrtbf/]|u[0-9a-fA-F]{4}|x[0-9a-fA-F]{2})|%[0-9A-Fa-f]{2})"
_ESCAPE_THEN_KEY = re.compile(_ESCAPE + "(?=" + "|".join(re.escape(p) for p in _KEY_PREFIXES) + ")")
#: The same escapes, read backwards from a key's start (`_holds_key`): `%20sk-...` in a URL
#: quoted by an error, `\x00sk-...` in a Python repr (rev34).
_ESCAPE_BEFORE = re.compile(_ESCAPE + r"\Z")
#: The shapes without the word boundary before them.
_KEY_SHAPES_AFTER = re.compile(_KEY_SHAPES.pattern.removeprefix(r"\b"), re.ASCII)


def _keys_after_escapes(text: str) -> str:
    """`text` with the keys right after a JSON escape masked (`_ESCAPE_THEN_KEY`)."""
    if "\\" not in text and "%" not in text:
        return text
    out: list[str] = []
    last = 0
    for e in _ESCAPE_THEN_KEY.finditer(text):
        if e.start() < last:
            continue
        m = _KEY_SHAPES_AFTER.match(text, e.end())
        if m is not None:
            out += (text[last : m.start()], REDACTED)
            last = m.end()
    return "".join(out) + text[last:] if out else text


#: A run of a JWT segment's characters, whole.
_SEGMENT_RUN = re.compile(r"[A-Za-z0-9_\-]*")


def _past_failed_jwt(text: str, at: int) -> int:
    """Where the next `eyJ` worth trying may stand after the one at `at` failed the shape: every
    later one in its run reaches the same end, so fails the same way, unless the run is longer
    than a first segment (1024 after `eyJ`), when its last 1027 characters may hold one."""
    end = _SEGMENT_RUN.match(text, at + 3).end()  # type: ignore[union-attr]  # `*` always matches
    return end if end - at <= 1027 else end - 1027


def redact_keys(text: str) -> str:
    """`text` with only API keys and `Bearer <token>` masked: for messages that name settings
    and show examples (`redact_text` would mask `LLMTAP_INGEST_TOKEN: Input should be ...`)."""
    text = _SCHEME.sub(lambda m: f"{m['scheme']}{m['sp']}{REDACTED}", text)
    return _KEY_SHAPES.sub(REDACTED, _keys_after_escapes(_glued_jwts(text)))


def redact_text(text: str) -> str:
    """`text` with credential-looking values masked: query pairs, `Authorization:`-like header
    lines, `Bearer <token>`, and well-known API key shapes."""
    if "@" in text:
        text = _USERINFO.sub(_hide_password, text)
    # `Bearer <token>` first: in `Authorization=Bearer <token>` the pair's value ends at the
    # space, so masking the pair first would leave the scheme's pattern nothing to match.
    text = _SCHEME.sub(lambda m: f"{m['scheme']}{m['sp']}{REDACTED}", text)
    text = _PAIR.sub(_pair, text)
    text = _HEADER.sub(lambda m: f"{m['name']}{m['sep']}{REDACTED}", text)
    return _KEY_SHAPES.sub(REDACTED, _keys_after_escapes(_glued_jwts(text)))


#: A JSON member whose value is a string or an array of strings: `"name": "value"`,
#: `"name": ["a", "b"]` (escapes inside the values kept).
_STR = r'"(?:[^"\\]|\\.)*"'
_JSON_MEMBER = re.compile(
    rf'"(?P<name>[^"\\]{{1,100}})"(?P<sep>\s*:\s*)(?P<value>{_STR}|\[\s*{_STR}(?:\s*,\s*{_STR})*\s*\])'
)
#: The same inside a JSON string (JSON quoted in JSON: `"{\"api_key\": \"...\"}"`).
_ESCAPED_MEMBER = re.compile(
    r'\\"(?P<name>[^"\\]{1,100})\\"(?P<sep>\s*:\s*)\\"(?P<value>(?:[^"\\]|\\[^"])*)\\"'
)
_ANY_STR = re.compile(_STR)


def _member(m: re.Match[str]) -> str:
    value = m["value"]
    if value in ('""', "[]") or not is_secret_name(m["name"]):
        return m.group()
    masked = _ANY_STR.sub(lambda s: s.group() if s.group() == '""' else f'"{REDACTED}"', value)
    return f'"{m["name"]}"{m["sep"]}{masked}'


def redact_body(text: str) -> str:
    """A captured body's text for a copy that leaves llmtap (webhook payloads): string and
    string-array members of JSON named like a credential (`"api_key": "..."`, the query-parameter
    rule) masked, also in JSON quoted inside a string, then `redact_text`. Only matched spans
    change, so a body without credentials stays byte-exact."""
    if '"' in text:
        text = _JSON_MEMBER.sub(_member, text)
        if '\\"' in text:
            text = _ESCAPED_MEMBER.sub(
                lambda m: (
                    f'\\"{m["name"]}\\"{m["sep"]}\\"{REDACTED}\\"'
                    if m["value"] and is_secret_name(m["name"])
                    else m.group()
                ),
                text,
            )
    return redact_text(text)


class CredentialFilter(logging.Filter):
    """Masks credentials in every record it sees; turns aiohttp's traceback for a malformed
    request (which quotes the raw request) into one line without the client's bytes."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            self._scrub(record)
        except Exception:  # a filter must never lose the line: fall back to a bare one
            record.msg, record.args = f"{record.name}: log line withheld (could not be redacted)", ()
            record.exc_info = record.exc_text = None
        return True

    def _scrub(self, record: logging.LogRecord) -> None:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and _is_bad_request(exc):
            code = getattr(exc, "code", 400)
            what = str(getattr(exc, "message", "") or type(exc).__name__).strip().splitlines()
            first = what[0] if what else type(exc).__name__
            # aiohttp quotes the offending bytes after the reason (`... when reading: b'...'`):
            # a header's value, with no name beside it for `redact_text` to know it by.
            first = _QUOTED.split(first, 1)[0].rstrip(": ").strip() or type(exc).__name__
            msg = record.getMessage().replace("Error handling request", "rejected a malformed request")
            record.msg = "%s: %s %s (request not shown: it may hold credentials)"
            record.args = (redact_text(msg), code, redact_text(first)[:200])
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            return
        msg = record.getMessage()
        red = redact_text(msg)
        if red != msg:
            record.msg, record.args = red, ()
        if record.exc_info and record.exc_info[0] is not None:
            text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
            record.exc_text = redact_text(text)
            record.exc_info = None
        elif record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        if record.stack_info:
            record.stack_info = redact_text(record.stack_info)


#: Where a parser's message starts quoting the client's bytes: `b'...'`, `'...'`, `"..."`.
_QUOTED = re.compile(r"""\bb?['"]|['"]""")


def _is_bad_request(exc: BaseException) -> bool:
    try:
        from aiohttp.http_exceptions import HttpProcessingError
    except ImportError:  # pragma: no cover - aiohttp is a dependency
        return False
    return isinstance(exc, HttpProcessingError)


#: Loggers that may quote a client's raw request (aiohttp's server side and client side).
AIOHTTP_LOGGERS = (
    "aiohttp.access",
    "aiohttp.client",
    "aiohttp.internal",
    "aiohttp.server",
    "aiohttp.web",
    "aiohttp.websocket",
)


def install_log_filter() -> CredentialFilter:
    """Put the filter on aiohttp's loggers (records created there) and on every handler of the
    root logger (records from anywhere that reach them). Idempotent."""
    filt = next(
        (f for f in logging.getLogger("aiohttp.server").filters if isinstance(f, CredentialFilter)),
        None,
    )
    if filt is None:
        filt = CredentialFilter()
    for name in AIOHTTP_LOGGERS:
        lg = logging.getLogger(name)
        if filt not in lg.filters:
            lg.addFilter(filt)
    for handler in logging.getLogger().handlers:
        if filt not in handler.filters:
            handler.addFilter(filt)
    return filt
