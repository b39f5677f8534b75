"""Suite-wide rules, and the fixtures several test files share.

In CI (`CI` set, as every CI system does) a test that needs a service which is not there must
FAIL, not skip: a run without Kafka, Redis, PostgreSQL, S3 or SQS would otherwise skip a third of the
suite, every failure test among them, and stay green. On a developer's machine the skip stays,
with its reason (how to start the services).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Generator

import pytest

SERVICE_MARKS = ("kafka", "redis", "postgres", "s3", "sqs")


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _skip_reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.skipped and in_ci():
        reason = _skip_reason(report)
        needs = [m for m in SERVICE_MARKS if item.get_closest_marker(m) is not None]
        if needs or "LLMTAP_TEST_" in reason or "services.sh" in reason:
            report.outcome = "failed"
            report.longrepr = (
                f"CI is set, so a test that cannot reach its service fails instead of skipping "
                f"(needs: {', '.join(needs) or 'a test service'}): {reason}"
            )
    return report


def pytest_report_header(config: pytest.Config) -> str:
    envs = {
        "postgres": ("LLMTAP_TEST_POSTGRES_URL",),
        "redis": ("LLMTAP_TEST_REDIS_URL",),
        "kafka": ("LLMTAP_TEST_KAFKA_BOOTSTRAP",),
        "s3": ("LLMTAP_TEST_S3_ENDPOINT", "LLMTAP_TEST_S3_BUCKET"),
        "sqs": ("LLMTAP_TEST_SQS_ENDPOINT",),
    }
    missing = [name for name, vs in envs.items() if not all(os.environ.get(v) for v in vs)]
    mode = "CI: missing services FAIL their tests" if in_ci() else "missing services skip their tests"
    return f"llmtap test services missing: {', '.join(missing) or 'none'} ({mode})"


# -- shared fixtures -------------------------------------------------------------------------------
@pytest.fixture
async def upstream() -> AsyncIterator[int]:
    """The fake provider upstream (every provider's wire format) on this test's loop; its port."""
    from llmtap.testing.fake_upstream import make_app, serve

    runner, port = await serve(make_app())
    yield port
    await runner.cleanup()
