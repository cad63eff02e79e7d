// The jobs page: renders the jobs from /api/jobs (the first time from the JSON the page carries) and asks again
// every few seconds, so a person watching sees jobs start, progress and end without reloading. Every text goes in
// through textContent: what a job's error or a model's name holds is shown, never run.
"use strict";

(function () {
  const table = document.getElementById("jobs");
  if (!table) return;
  const every = Number(table.dataset.refreshMs) || 2000;
  const body = table.querySelector("tbody");
  const problem = document.getElementById("problem");

  function text(tag, value, cls) {
    const el = document.createElement(tag);
    if (value !== null && value !== undefined) el.textContent = String(value);
    if (cls) el.className = cls;
    return el;
  }

  function row(job) {
    const tr = document.createElement("tr");
    tr.id = "job-" + job.id;
    tr.dataset.state = job.state;
    tr.className = "state-" + job.state;
    tr.append(text("td", job.id, "num"));
    const model = document.createElement("td");
    if (job.build) {
      const a = text("a", job.model);
      a.href = "/builds/" + encodeURIComponent(job.build);
      model.append(a);
    } else {
      model.append(text("span", job.model));
    }
    model.append(text("span", "@" + job.revision, "muted"));
    if (job.kind !== "build") model.append(text("span", " (" + job.kind + ")", "muted"));
    tr.append(model, text("td", job.profile));
    const state = document.createElement("td");
    state.append(text("span", job.state, "badge " + job.state));
    tr.append(state, text("td", job.attempts, "num"), text("td", job.next_attempt || "—"));
    const what = document.createElement("td");
    what.className = "what";
    if (job.progress) what.append(text("div", job.progress, "progress"));
    if (job.worker) what.append(text("div", "on " + job.worker, "muted"));
    if (job.error) what.append(text("div", job.error, "error"));
    if (job.fix) what.append(text("div", "fix: " + job.fix, "fix"));
    tr.append(what, text("td", job.updated, "muted"));
    return tr;
  }

  function render(view) {
    body.replaceChildren(...view.jobs.map(row));
    document.getElementById("no-jobs").hidden = view.jobs.length > 0 || Boolean(view.problem);
    const counts = Object.entries(view.counts).map(([state, n]) => n + " " + state);
    document.getElementById("counts").textContent = counts.length ? counts.join(" · ") : "empty";
    problem.hidden = !view.problem;
    problem.textContent = view.problem || "";
    document.getElementById("refreshed").textContent = new Date().toLocaleTimeString();
  }

  async function refresh() {
    try {
      const answer = await fetch("/api/jobs", { cache: "no-store" });
      if (answer.ok) render(await answer.json());
    } catch (e) {
      // The dashboard's server stopped: said on the page; the next try may reach it again.
      problem.hidden = false;
      problem.textContent = "cannot reach the dashboard's server (" + e.message + "); trying again";
    }
    setTimeout(refresh, every);
  }

  render(JSON.parse(document.getElementById("jobs-data").textContent));
  setTimeout(refresh, every);
})();
