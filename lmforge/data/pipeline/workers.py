"""Where shard tasks run: in this process, in a pool of local processes, or as Ray tasks.

Why one small interface: a shard task is a plain function of picklable arguments whose result is
a small dict, and the executor merges results in shard order, so the output bytes cannot depend
on where, or in which order, the tasks ran. Ray is imported only when asked for (`executor =
"ray"`; `pip install -e .[ray]`): `ray_address = ""` starts a local Ray instance for the run
(tests, one machine) and stops it after; "auto" or "ray://host:10001" joins an existing cluster,
whose nodes must have lmforge installed and see the same paths (a shared file system).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from lmforge.data.errors import DataError

__all__ = ["shard_mapper"]

Mapper = Callable[[Callable[[tuple], Any], list[tuple]], list[Any]]


def _serial(fn: Callable[[tuple], Any], args: list[tuple]) -> list[Any]:
    return [fn(a) for a in args]


@contextmanager
def _local_pool(workers: int) -> Iterator[Mapper]:
    with mp.get_context("spawn").Pool(workers) as pool:
        yield lambda fn, args: list(pool.imap(fn, args, chunksize=1)) if len(args) > 1 else _serial(fn, args)


def _check_reachable(address: str) -> None:
    """A host:port address (optionally ray://) must accept a TCP connection within 5 s: Ray itself
    retries an unreachable address for minutes before it fails."""
    hostport = address.removeprefix("ray://")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto" and other forms: Ray answers those quickly itself
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
    except OSError as e:
        raise DataError(f"ray_address = {address!r}: cannot join a Ray cluster there ({e.strerror or e})") from None


@contextmanager
def _ray(address: str, workers: int) -> Iterator[Mapper]:
    try:
        import ray
    except ImportError:
        raise DataError('executor = "ray" needs the ray package: pip install -e ".[ray]"') from None
    started = not ray.is_initialized()
    if started:
        try:
            if address:
                _check_reachable(address)
                ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR)
            else:
                ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
        except ConnectionError as e:
            raise DataError(f"ray_address = {address!r}: cannot join a Ray cluster there ({e})") from None

    def mapper(fn: Callable[[tuple], Any], args: list[tuple]) -> list[Any]:
        task = ray.remote(num_cpus=1, max_retries=2)(fn)
        return ray.get([task.remote(a) for a in args])  # in submission order = shard order

    try:
        yield mapper
    finally:
        if started:
            ray.shutdown()


@contextmanager
def shard_mapper(executor: str, workers: int, ray_address: str = "") -> Iterator[Mapper]:
    """A function mapping a task over argument tuples, results in argument order."""
    if executor == "ray":
        with _ray(ray_address, workers) as m:
            yield m
    elif workers > 1:
        with _local_pool(workers) as m:
            yield m
    else:
        yield _serial
