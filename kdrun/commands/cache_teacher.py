"""``kdrun cache-teacher [overrides]``: fill (or check) the teacher-output cache of a training config once,
before a sweep of runs that share it (:mod:`kdrun.teacher_cache`).

Takes exactly the overrides ``kdrun train`` would get (``+recipe=...``, ``teacher=...``, ``dataset.root=...``,
``trainer.channels_last=...``; ``teacher.cache={...}`` for non-default cache settings, which is turned on
with its defaults when the config leaves it ``null``) and builds what the run's cache key is made of with
the run's own code: :func:`kdrun.engine.build.build_teacher_side` (the start of every build, from the seed:
data, task, loss terms with their teacher taps, the teacher), then the cache through
:func:`kdrun.teacher_cache.orchestrate.open_run_cache`, as the run opens it. So a run with the same
overrides finds the cache — and a run that would not (another teacher, data, transform, taps or call
conditions) is refused by the key check, never misled.

Exit status: 0 when the cache is filled now or was already up to date; 2 when it cannot be used (a cache
at the key's directory that does not match or is damaged, a fill left unfinished, a continuous
augmentation, a bad config), with the message.
"""
from __future__ import annotations

import sys
from typing import Any

from omegaconf import open_dict

from kdrun.compose import compose_train_config
from kdrun.config import ConfigError, validate


def cache_teacher(argv: list[str], progress: bool = True) -> dict[str, Any]:
    """Fill or check the cache for the training config of ``argv``; returns what :func:`main` prints."""
    from kdrun.engine.build import build_teacher_side
    from kdrun.engine.environment import pick_device, set_backend_flags
    from kdrun.engine.teacher import check_teacher_weights, needs_fit
    from kdrun.teacher_cache.orchestrate import open_run_cache

    cfg = compose_train_config(argv)
    if cfg.get("teacher") is None:
        raise ConfigError("kdrun cache-teacher needs a teacher (teacher=... or a recipe); this config has none.")
    if cfg.teacher.get("cache") is None:
        with open_dict(cfg):
            cfg.teacher.cache = {}  # the defaults (kdrun.config.TeacherCacheConfig)
    settings = validate(cfg)
    conf = settings.teacher_cache
    assert conf is not None
    trainer = settings.trainer
    if needs_fit(cfg) is not None:
        raise ConfigError(f"teacher.checkpoint={cfg.teacher.checkpoint} does not exist yet (the run would fit it "
                          "first); run `kdrun train` with these overrides, or fit the teacher, then cache it.")
    check_teacher_weights(cfg)
    device = pick_device(trainer.accelerator)
    set_backend_flags(trainer, device)
    seed = settings.seed
    # The run's build from the seed up to the teacher (a teacher without a checkpoint is drawn there).
    side = build_teacher_side(cfg, trainer, device, seed)
    assert side.teacher is not None
    # The command fills whatever teacher.cache.fill says (that key is for runs); another process's fill is
    # waited for. CacheError: a stale, damaged or unfinished cache.
    got = open_run_cache(cfg, trainer, conf, side.data, side.teacher, device, progress=progress, fill_missing=True)
    cache, path, filled = got.cache, got.path, got.filled
    size = sum(s.nbytes for s in cache.specs.values())
    return {"path": str(path), "filled": filled, "bytes": size, "images": cache.num_images,
            "views": cache.num_views, "arrays": {n: s.shape for n, s in cache.specs.items()},
            "dtype": conf.dtype, "exact": cache.exact,
            "views_per_s": cache.meta.get("info", {}).get("fill_views_per_s") if filled else None,
            "render": cache.meta.get("info", {}).get("fill_render")}


def main(argv: list[str] | None = None) -> int:
    """``kdrun cache-teacher``: exit 0 when the cache is up to date (filled now or before), 2 when not usable."""
    from kdrun.errors import find_user_error

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    try:
        info = cache_teacher(argv)
    except Exception as e:  # user errors (config, cache, augmentation): one paragraph, exit 2
        user = find_user_error(e)
        if user is None:
            raise
        print(f"kdrun cache-teacher: {user}", file=sys.stderr, flush=True)
        return 2
    arrays = ", ".join(f"{n} {s}" for n, s in info["arrays"].items())
    print(f"teacher cache {'filled' if info['filled'] else 'up to date'}: {info['path']}\n"
          f"  {info['images']} images × {info['views']} views, {info['dtype']}, {info['bytes'] / 2**30:.3f} GiB "
          f"({arrays})\n  exact (bit-identical to the live teacher): {'yes' if info['exact'] else 'no'}"
          + (f"\n  fill: {info['views_per_s']:.0f} views/s on rank 0 (rendered {info['render']})"
             if info["views_per_s"] else ""),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
