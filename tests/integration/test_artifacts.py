"""The artifact store under concurrent writers in separate processes (pods sharing one volume).

Two processes write the same paths at once while this process reads them: every read must be a whole file of one
writer (never a torn or empty one), no temporary file may be left, and compare-and-set activation must lose no
update (each successful ``activate(expected=vN)`` moves ACTIVE from vN to vN+1, so the final N counts them all).
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
from pathlib import Path

from residual.io import atomic_write
from service.stores.artifacts import ArtifactStore

ROUNDS = 150
SIZE = 256 * 1024


def _payload(writer: int, k: int) -> bytes:
    body = os.urandom(SIZE)
    head = f"{writer}:{k}:".encode()
    return head + body + hashlib.sha256(head + body).digest()


def _whole(blob: bytes) -> bool:
    return len(blob) > 32 and hashlib.sha256(blob[:-32]).digest() == blob[-32:]


def _writer(root: str, writer: int, start: mp.synchronize.Event, results: mp.Queue) -> None:
    store = ArtifactStore(root)
    target = Path(root) / "shared" / "blob.bin"
    start.wait()
    wins = 0
    for k in range(ROUNDS):
        atomic_write(target, _payload(writer, k))
        current = store.active("race")
        n = int(current.split("-")[1])
        if store.activate("race", f"v-{n + 1}", expected=current):
            wins += 1
    results.put(wins)


def test_two_processes_writing_the_same_paths(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    folder = store.coefficient_dir("race")
    folder.mkdir(parents=True)
    for n in range(2 * ROUNDS + 1):  # every version a writer may activate exists
        (folder / f"v-{n}.safetensors").write_bytes(b"")
    assert store.activate("race", "v-0")
    target = tmp_path / "shared" / "blob.bin"
    atomic_write(target, _payload(9, 0))

    ctx = mp.get_context("spawn")
    start, results = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w, start, results)) for w in (1, 2)]
    for p in procs:
        p.start()
    start.set()
    reads = 0
    writers_seen: set[bytes] = set()
    while any(p.is_alive() for p in procs):
        blob = target.read_bytes()
        assert _whole(blob), f"a reader saw a partial file ({len(blob)} bytes)"
        writers_seen.add(blob.split(b":", 1)[0])
        reads += 1
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    wins = [results.get(timeout=10) for _ in procs]
    assert reads > 10 and writers_seen & {b"1", b"2"}
    final = int(store.active("race").split("-")[1])  # type: ignore[union-attr]
    assert final == sum(wins), f"lost updates: ACTIVE moved {final} times but {sum(wins)} activations succeeded"
    assert min(wins) > 0
    leftovers = [p.name for p in tmp_path.rglob("*.tmp")]
    assert leftovers == [], leftovers
    assert _whole(target.read_bytes())
