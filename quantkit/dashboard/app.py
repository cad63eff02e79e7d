"""The dashboard's web application: Starlette routes (GET only: nothing a page does changes a job or a build),
Jinja templates with autoescaping, and a Content-Security-Policy that lets only the dashboard's own script file
run, so that HTML in a model name or a smoke reply is shown as text and could not run even if an escape were
missed.

Routes:
  /                       the jobs page (it refreshes itself from /api/jobs)
  /api/jobs               the jobs as JSON (views.JobsView)
  /builds                 the builds under --builds
  /builds/NAME            a build's page: file table, plot, inversions, provenance
  /builds/NAME/plot.svg   its size-vs-KLD plot
  /static/...             the page's script, style sheet and icon
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from ..errors import QuantkitError
from ..jobs.queue import JobQueue
from ..results import Report
from .public import public_value
from .views import BuildIndex, build_view, jobs_view

HERE = Path(__file__).parent
REFRESH_MS = 2000
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


@dataclass(frozen=True)
class DashboardOptions:
    """What `quantkit serve` shows. queue: --queue as open_queue takes it (None: $QUANTKIT_QUEUE, else the default
    SQLite file); builds: where the builds are (views.BuildIndex: a folder of builds, one build, or a store URL)."""

    queue: str | None = None
    builds: str = "builds"
    host: str = "127.0.0.1"
    port: int = 8750


def make_app(options: DashboardOptions):
    import jinja2
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles
    from starlette.templating import Jinja2Templates

    from ..jobs.queue import open_queue

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True, trim_blocks=True,
                             lstrip_blocks=True, finalize=public_value, undefined=jinja2.StrictUndefined)
    templates = Jinja2Templates(env=env)
    builds = BuildIndex(options.builds)
    queue_state: dict[str, JobQueue | QuantkitError | None] = {"queue": None}

    def queue() -> tuple[JobQueue | None, QuantkitError | None]:
        """The queue, opened on first use and again after a failure (a server that was down may be back)."""
        if not isinstance(queue_state["queue"], JobQueue):
            try:
                queue_state["queue"] = open_queue(options.queue)
            except QuantkitError as e:
                queue_state["queue"] = e
        q = queue_state["queue"]
        return (q, None) if isinstance(q, JobQueue) else (None, q)

    def page(request, name: str, status_code: int = 200, **context):
        return templates.TemplateResponse(request, name, context, status_code=status_code, headers=HEADERS)

    def report(name: str, listing: dict[str, str] | None = None) -> Report:
        found = builds.read(name, listing)
        if found is None:
            raise HTTPException(404, f"no build {name!r} in the dashboard's builds folder")
        return found

    def jobs_page(request):
        return page(request, "jobs.html", view=jobs_view(*queue(), builds), refresh_ms=REFRESH_MS, section="jobs")

    def jobs_api(request):
        return JSONResponse(jobs_view(*queue(), builds).to_json(), headers=HEADERS)

    def builds_page(request):
        views, problems = [], []
        listing = builds.reports()
        for name in listing:
            try:
                views.append(build_view(name, report(name, listing)))
            except QuantkitError as e:
                problems.append(f"{name}: {e}")
        return page(request, "builds.html", views=views, problems=problems, section="builds")

    def build_page(request):
        name = request.path_params["name"]
        try:
            view = build_view(name, report(name))
        except QuantkitError as e:
            return page(request, "problem.html", 500, problem=f"{name}: {e}; fix: {e.hint}", section="builds")
        return page(request, "build.html", view=view, section="builds")

    def plot(request):
        from ..publish.plot import size_vs_kld

        try:
            built = report(request.path_params["name"])
        except QuantkitError as e:
            raise HTTPException(500, f"{e}; fix: {e.hint}") from None
        svg = io.BytesIO()
        size_vs_kld(built, svg, "svg")
        return Response(svg.getvalue(), media_type="image/svg+xml", headers=HEADERS)

    def problem(request, exc):
        return page(request, "problem.html", exc.status_code, problem=exc.detail, section="")

    return Starlette(routes=[
        Route("/", jobs_page),
        Route("/api/jobs", jobs_api),
        Route("/builds", builds_page),
        Route("/builds/{name}", build_page),
        Route("/builds/{name}/plot.svg", plot),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ], exception_handlers={404: problem, 405: problem, 500: problem})
