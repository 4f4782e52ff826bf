"""The Postfix milter: pymilter's callbacks (adapter), spoken by libmilter or by postroom's asyncio engine (aio)."""

from collections.abc import Callable

from postroom.milter.adapter import Pipeline, PostroomMilter, Runtime, make_factory, run

__all__ = ["PostroomMilter", "Runtime", "make_factory", "run", "serve"]


def serve(pipeline: Pipeline, reload: Callable[[Pipeline], Pipeline | None] | None = None) -> None:
    """Serve with the engine [milter] engine names until SIGTERM or SIGINT; SIGHUP reloads.  Blocks."""
    milter = pipeline.config.milter
    if milter.engine == "asyncio":
        from postroom.milter import aio  # noqa: PLC0415  (asyncio is loaded by redis-py anyway; the module is not)

        aio.run(pipeline, reload)
    else:
        run(pipeline, reload)
