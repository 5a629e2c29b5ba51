"""The elastic_llm page of the Dask dashboard (``/fleet``), drawn by `FleetFigures`.

Two ways onto the dashboard:

- ``dask scheduler --preload elastic_llm.cluster.dashboard_page``: importing this module before
  the scheduler is built adds the page to ``distributed.dashboard.scheduler.applications``, so it
  is served and listed in the navigation bar from the start;
- at run time: the controller's `start` calls `add_to_dashboard(scheduler)` (a `LocalCluster`,
  or any scheduler without the preload), which serves the page through a second
  `BokehApplication` and adds it to the navigation bar of pages opened afterwards.

The page reads the controller (the scheduler plugin named ``elastic_llm``) in the scheduler's own
process once a second; without a controller it says so.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from elastic_llm.cluster.fleet_figures import FleetFigures

logger = logging.getLogger(__name__)

#: The page's route on the dashboard.
ROUTE = "/fleet"
#: Milliseconds between two redraws.
REFRESH_MS = 1000
_CONTROLLER = "elastic_llm"  # the controller plugin's name (`controller.PLUGIN_NAME`)


def _history(scheduler: Any) -> dict[str, Any] | None:
    controller = getattr(scheduler, "plugins", {}).get(_CONTROLLER)
    history = getattr(controller, "history", None)
    return None if history is None else dict(history.to_dict())


def fleet_doc(scheduler: Any, extra: dict[str, Any], doc: Any) -> None:
    """Bokeh application function of the page (``fn(scheduler, extra, doc)``, as Dask's pages)."""
    figures = FleetFigures()

    def refresh() -> None:
        history = _history(scheduler)
        if history is None:
            figures.summary.text = "no elastic_llm controller on this scheduler yet (start a ServingClient)"
            return
        figures.update(history, time.time())

    refresh()
    doc.add_periodic_callback(refresh, REFRESH_MS)
    doc.title = "Dask: elastic_llm fleet"
    doc.add_root(figures.layout)
    try:  # Dask's page frame and theme, when the dashboard's templates are importable
        from distributed.dashboard.components.scheduler import BOKEH_THEME, env
        doc.template = env.get_template("simple.html")
        doc.template_variables.update(extra)
        doc.theme = BOKEH_THEME
    except ImportError:  # pragma: no cover - bokeh is a dependency
        pass


def _register_for_new_schedulers() -> bool:
    """Add the page to the applications every scheduler built from now on serves."""
    try:
        from distributed.dashboard.scheduler import applications
    except ImportError:
        logger.warning("elastic_llm: the Dask dashboard is unavailable (bokeh missing?): no %s page", ROUTE)
        return False
    applications.setdefault(ROUTE, fleet_doc)
    return True


def _served(scheduler: Any) -> bool:
    app = getattr(scheduler, "http_application", None)
    return any(ROUTE in getattr(tornado, "app_paths", ()) for tornado in getattr(app, "applications", []))


def add_to_dashboard(scheduler: Any) -> bool:
    """Serve the page on a running scheduler's dashboard (no-op where it is already served or
    the scheduler has no dashboard); returns whether the page is served now."""
    if getattr(scheduler, "http_server", None) is None or getattr(scheduler, "http_application", None) is None:
        return False
    if not _served(scheduler):
        try:
            from tornado.ioloop import IOLoop

            from distributed.dashboard.core import BokehApplication
            from distributed.dashboard.scheduler import template_variables
        except ImportError:
            logger.warning("elastic_llm: the Dask dashboard is unavailable (bokeh missing?): no %s page", ROUTE)
            return False
        variables = template_variables(scheduler)
        app = BokehApplication({ROUTE: fleet_doc}, scheduler, prefix="",
                               template_variables=variables)
        scheduler.http_application.add_application(app)
        app.initialize(IOLoop.current())
    _list_in_navigation(scheduler)
    return _served(scheduler)


def _list_in_navigation(scheduler: Any) -> None:
    """Add the page to the navigation bar of every dashboard page opened from now on (Dask keeps
    one memoized list of page names per scheduler, shared by all its pages)."""
    try:
        from distributed.dashboard.scheduler import template_variables
    except ImportError:
        return
    pages = template_variables(scheduler)["pages"]
    if ROUTE.strip("/") not in pages:
        pages.append(ROUTE.strip("/"))


def dask_setup(scheduler: Any) -> None:
    """Preload hook of ``dask scheduler --preload elastic_llm.cluster.dashboard_page``: the page
    itself was added at import, before the scheduler was built; this lists it in the navigation."""
    _list_in_navigation(scheduler)


_register_for_new_schedulers()
