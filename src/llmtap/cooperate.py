"""Python work done for many records in one go yields to the event loop every `SLICE` records.

In `llmtap up` the gateway, the worker and the server share one event loop. A batch of 500
records decoded, built, searched for text or priced in one go would hold every request in
flight for as long (at 20-60 us a record, 10-30 ms): the latency users feel. So every loop over
a batch's records that does Python work on the event loop gives the loop a turn every `SLICE`
records (`await asyncio.sleep(0)`: the requests that became ready run, then the batch goes on).
"""

from __future__ import annotations

#: Records of Python work between two turns of the event loop.
SLICE = 32
