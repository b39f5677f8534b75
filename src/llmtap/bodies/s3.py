"""Bodies in S3-compatible object storage (`LLMTAP_BODIES=s3://bucket/prefix`).

aiobotocore is the maintained asyncio S3 client (botocore's signing and retries, aiohttp for
I/O). Objects are the compressed bytes the record carries, under `<prefix>/<body_key>`: tenant,
date and request id, so retention and per-tenant export are prefix listings. Uploads of a batch
run concurrently, bounded, on one pooled client; an unreachable endpoint is a `TransientError`
(the worker retries without acknowledging) and a missing bucket at start-up is one sentence.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Sequence
from datetime import date
from typing import Any
from urllib.parse import urlsplit

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from llmtap.bodies.base import BodyStore
from llmtap.errors import BackendUnavailable, ConfigError, NotDeleted, TransientError, unknown_host
from llmtap.redact import redact_text, redact_url

_CONCURRENCY = 32
#: Keys per listing page (S3's maximum; tests lower it to walk pages).
_PAGE = 1000
#: Tenants whose day folders the retention sweep lists at once.
_SWEEPS = 8
#: The last segment of a `body_key` (older keys had no digest): the day-folder sweep deletes
#: nothing else, so a bucket shared with other data loses none of it.
_BODY_NAME = re.compile(r"[^/]+\.(?:request|response|events)(?:\.[0-9a-f]+)?\.zst")


#: What S3 answers to a bucket URL or credentials that are wrong (HEAD answers bare codes).
_WRONG_BUCKET = {
    "404": "no such bucket (create it, or fix the name in LLMTAP_BODIES)",
    "NoSuchBucket": "no such bucket (create it, or fix the name in LLMTAP_BODIES)",
    "403": "access denied (check the S3 credentials and the bucket's policy)",
    "AccessDenied": "access denied (check the S3 credentials and the bucket's policy)",
    "InvalidAccessKeyId": "the access key is not known (check AWS_ACCESS_KEY_ID)",
    "SignatureDoesNotMatch": "the secret key does not match (check AWS_SECRET_ACCESS_KEY)",
}


class S3BodyStore(BodyStore):
    def __init__(
        self,
        url: str,
        *,
        endpoint: str | None = None,
        region: str = "us-east-1",
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc:
            raise ValueError(f"body store URL must be s3://bucket/prefix, got {redact_url(url)!r}")
        self.bucket = parts.netloc
        self.prefix = parts.path.strip("/")
        self.endpoint = endpoint
        self.region = region
        self._creds = (access_key_id, secret_access_key)
        self._client: Any = None
        self._stack = contextlib.AsyncExitStack()
        self._sem = asyncio.Semaphore(_CONCURRENCY)
        where = f" at {redact_url(endpoint)}" if endpoint else ""
        self.description = f"s3://{self.bucket}/{self.prefix}{where}"

    @property
    def _where(self) -> str:
        return redact_url(self.endpoint) if self.endpoint else "AWS"

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    async def connect(self) -> None:
        session = get_session()
        config = AioConfig(
            connect_timeout=5,
            read_timeout=30,
            retries={"max_attempts": 2, "mode": "standard"},
            max_pool_connections=_CONCURRENCY,
            s3={"addressing_style": "path"},
        )
        # Named `self._client` only once the bucket answered: a retrying connect (a server
        # started during an outage) must not hand reads a client its failure then closes.
        client = await self._stack.enter_async_context(
            session.create_client(
                "s3",
                endpoint_url=self.endpoint,
                region_name=self.region,
                aws_access_key_id=self._creds[0],
                aws_secret_access_key=self._creds[1],
                config=config,
            )
        )
        try:
            await client.head_bucket(Bucket=self.bucket)
        except ClientError as e:
            await self.close()
            code = str(e.response.get("Error", {}).get("Code", "?"))
            if code in _WRONG_BUCKET:  # S3 answered: a setting to fix, not an outage to wait out
                raise ConfigError(
                    f"invalid setting LLMTAP_BODIES: S3 at {self._where} answers {code} for bucket"
                    f" {self.bucket!r}: {_WRONG_BUCKET[code]}"
                ) from None
            raise BackendUnavailable(
                f"S3 bucket {self.bucket!r} is not usable at {self._where} ({code}); "
                "create it or check LLMTAP_BODIES and the S3 credentials"
            ) from None
        except NoCredentialsError:
            await self.close()
            raise ConfigError(
                f"invalid setting LLMTAP_BODIES: no AWS credentials for S3 at {self._where}"
                " (set LLMTAP_S3_ACCESS_KEY_ID and LLMTAP_S3_SECRET_ACCESS_KEY, or AWS_ACCESS_KEY_ID and"
                " AWS_SECRET_ACCESS_KEY, AWS_PROFILE or a role)"
            ) from None
        except (BotoCoreError, OSError) as e:
            await self.close()
            if unknown_host(e):
                raise ConfigError(f"invalid setting LLMTAP_S3_ENDPOINT: unknown host {self._where}") from None
            raise BackendUnavailable(
                f"cannot reach S3 endpoint {self._where}: {redact_text(str(e))}"
            ) from None
        self._client = client

    def _connected(self) -> Any:
        if self._client is None:  # not connected yet (started during an S3 outage)
            raise TransientError(f"S3 at {self._where} is not connected yet")
        return self._client

    async def close(self) -> None:
        await self._stack.aclose()
        self._stack = contextlib.AsyncExitStack()
        self._client = None

    async def _put(self, key: str, data: bytes) -> None:
        client = self._connected()
        async with self._sem:
            await client.put_object(
                Bucket=self.bucket, Key=self._key(key), Body=data, ContentType="application/zstd"
            )

    async def put_many(self, items: Sequence[tuple[str, bytes]]) -> list[str]:
        try:
            await asyncio.gather(*(self._put(k, v) for k, v in items))
            return [k for k, _ in items]
        except (TimeoutError, BotoCoreError, ClientError, OSError) as e:
            raise TransientError(f"S3 upload failed: {e}") from e

    async def get(self, key: str) -> bytes | None:
        try:
            resp = await self._connected().get_object(Bucket=self.bucket, Key=self._key(key))
            async with resp["Body"] as stream:
                data: bytes = await stream.read()
                return data
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise TransientError(f"S3 download failed: {e}") from e
        except (BotoCoreError, OSError) as e:
            raise TransientError(f"S3 download failed: {e}") from e

    async def delete_many(self, keys: Sequence[str]) -> None:
        ref_of = {self._key(k): k for k in keys}
        refused, first = await self._delete(list(ref_of))
        if refused:
            raise NotDeleted(
                f"S3 refused to delete {len(refused)} of {len(keys)} bodies "
                f"({first.get('Code')}: {first.get('Message')}, e.g. {first.get('Key')})",
                [ref_of.get(k, k) for k in refused],
            )

    async def _delete(self, keys: Sequence[str]) -> tuple[list[str], dict[str, Any]]:
        """Delete objects by full key; the keys S3 refused one by one, and its first refusal."""
        refused: list[str] = []
        first: dict[str, Any] = {}
        client = self._connected()
        for i in range(0, len(keys), 1000):  # S3's DeleteObjects limit
            chunk = keys[i : i + 1000]
            try:
                answer = await client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in chunk], "Quiet": True}
                )
            except (BotoCoreError, ClientError, OSError) as e:
                raise TransientError(f"S3 delete failed: {e}") from e
            # A 200 may still refuse keys one by one (permissions, a lock, SlowDown per key):
            # retention must not take their bodies for deleted. The other chunks go on.
            for err in answer.get("Errors") or ():
                if err.get("Code") != "NoSuchKey":
                    refused.append(err.get("Key", ""))
                    first = first or err
        return refused, first

    async def delete_days_before(self, day: date) -> int:
        """Delete the bodies of every `<tenant>/<yyyy>/<mm>/<dd>/` folder before `day`, named by a
        record or not: what retention's refs miss (a reused id's second body, a body whose
        delete failed before a restart) goes with its day, as on the file store. Only years and
        months that can hold such a day are listed, so a round after the first lists little;
        tenants are walked `_SWEEPS` at a time (listings are round trips)."""
        refused: list[str] = []
        first: dict[str, Any] = {}
        walks = asyncio.Semaphore(_SWEEPS)

        async def walk(tenant: str) -> int:
            nonlocal first
            async with walks:
                gone = 0
                async for year, y in self._folders(tenant, 4):
                    if y > day.year:
                        continue
                    async for month, m in self._folders(year, 2):
                        if (y, m) > (day.year, day.month):
                            continue
                        async for folder, d in self._folders(month, 2):
                            if not _before(y, m, d, day):
                                continue
                            went = False
                            async for keys in self._names(folder):  # a page at a time: flat memory
                                no, err = await self._delete(keys)
                                refused.extend(no)
                                first = first or err
                                went = went or len(no) < len(keys)
                            gone += went
                return gone

        gone = 0
        async for page in self._pages(self._key(""), delimiter="/"):
            tenants = [p["Prefix"] for p in page.get("CommonPrefixes") or ()]
            gone += sum(await asyncio.gather(*(walk(t) for t in tenants)))
        if refused:
            raise NotDeleted(
                f"S3 refused to delete {len(refused)} bodies of day folders before {day}"
                f" ({first.get('Code')}: {first.get('Message')}, e.g. {first.get('Key')})",
                refused,
            )
        return gone

    async def _folders(self, under: str, digits: int = 0) -> AsyncIterator[tuple[str, int]]:
        """The folders (`CommonPrefixes`) right under `under`, with their number; with `digits`,
        only those named by that many digits."""
        async for page in self._pages(under, delimiter="/"):
            for p in page.get("CommonPrefixes") or ():
                name = p["Prefix"][len(under) : -1]
                if not digits:
                    yield p["Prefix"], 0
                elif len(name) == digits and name.isascii() and name.isdigit():
                    yield p["Prefix"], int(name)

    async def _names(self, folder: str) -> AsyncIterator[list[str]]:
        """The keys of bodies right in `folder`, a listing page at a time (none empty)."""
        async for page in self._pages(folder, delimiter="/"):
            names = [o["Key"] for o in page.get("Contents") or ()]
            if keys := [k for k in names if _BODY_NAME.fullmatch(k[len(folder) :])]:
                yield keys

    async def _pages(self, prefix: str, delimiter: str) -> AsyncIterator[dict[str, Any]]:
        paginator = self._connected().get_paginator("list_objects_v2")
        try:
            async for page in paginator.paginate(
                Bucket=self.bucket, Prefix=prefix, Delimiter=delimiter, PaginationConfig={"PageSize": _PAGE}
            ):
                yield page
        except (BotoCoreError, ClientError, OSError) as e:
            raise TransientError(f"S3 listing failed: {e}") from e


def _before(y: int, m: int, d: int, day: date) -> bool:
    try:
        return date(y, m, d) < day
    except ValueError:  # not a day (13/45): not a folder llmtap wrote
        return False
