"""_checks.IndexCache: values per live, unchanged index tensor (least recently used out first, a cap per tensor)."""

import torch

from lowrankopt._checks import IndexCache


def test_index_cache_keeps_refreshes_and_forgets():
    cache = IndexCache(2, per_tensor=2)
    calls = []

    def build(tag):
        return lambda: calls.append(tag) or tag

    a, b, c = (torch.arange(6).reshape(3, 2) for _ in range(3))
    assert cache.get(a, "k", build("a")) == "a" and cache.get(a, "k", build("again")) == "a"
    cache.get(b, "k", build("b"))
    cache.get(a, "k", build("a2"))  # a used last: c evicts b, not a
    cache.get(c, "k", build("c"))
    assert cache.get(a, "k", build("a3")) == "a" and cache.get(b, "k", build("b2")) == "b2"
    a[0, 0] = 5  # changed in place: rebuilt, without evicting another tensor
    assert cache.get(a, "k", build("a4")) == "a4" and len(cache._entries) == 2
    for key in ("k1", "k2", "k3"):  # at most two values per tensor, the oldest out first
        cache.get(a, key, build(key))
    assert cache.get(a, "k1", build("k1 again")) == "k1 again"
    n = len(cache._entries)
    del a
    assert len(cache._entries) == n - 1  # dropped with its tensor
    assert calls == ["a", "b", "c", "b2", "a4", "k1", "k2", "k3", "k1 again"]
    with torch.inference_mode():  # a state that cannot be read: never cached
        t = torch.zeros(2, 2, dtype=torch.int64)
    assert cache.get(t, "k", build("t")) == "t" and cache.get(t, "k", build("t2")) == "t2"
