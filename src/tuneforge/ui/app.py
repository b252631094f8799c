"""The FastAPI application of ``tuneforge ui``: server-rendered pages, a small JSON API, no state of its own.

Everything shown is read from the run directories under ``--runs`` at request time; everything started (train,
resume, eval, export, merge, abtest, report) is a detached ``tuneforge`` process (:mod:`tuneforge.ui.jobs`);
chat goes through ``tuneforge serve`` (:mod:`tuneforge.ui.chat`).
"""

# no `from __future__ import annotations`: FastAPI reads the route annotations (Request) at runtime
import re
import threading
import time
from pathlib import Path
from typing import Any

from tuneforge.errors import UserError
from tuneforge.models.reference import RUN_BASE, RUN_CONFIG, RUN_REPORT, is_run_dir
from tuneforge.ui import forms, jobs
from tuneforge.ui.runs import UI_DIR, list_runs, read_json, read_metrics, read_yaml, run_detail
from tuneforge.ui.security import TOKEN_COOKIE, Policy, Roots

HERE = Path(__file__).parent
PAGES = {"/": "runs.html", "/run": "run.html", "/new": "new.html", "/chat": "chat.html",
         "/compare": "compare.html", "/abtest": "abtest.html", "/export": "export.html", "/search": "search.html",
         "/jobs": "jobs.html"}
NAV = [("/", "Runs"), ("/new", "New run"), ("/chat", "Chat"), ("/compare", "Compare"), ("/export", "Merge / export"),
       ("/search", "Search"), ("/jobs", "Jobs")]
STUDY_FILES = ("search.html", "best.yaml")


def create_app(runs_dir: str | Path, *, data_roots: list[str | Path] = (), host: str = "127.0.0.1",
               token: str | None = None, extra_hosts: tuple[str, ...] = ()):
    """The UI application over ``runs_dir``.

    Args:
        runs_dir: the runs directory (``--runs``); created when missing.
        data_roots: further directories whose files forms may name (``--data-root``).
        host: the bound address (non-loopback needs ``token``).
        token: access token (required for non-loopback binds).
        extra_hosts: further ``Host`` names to accept (e.g. ``testserver`` in tests).
    """
    from fastapi import FastAPI, Request
    from fastapi.responses import (
        FileResponse,
        HTMLResponse,
        JSONResponse,
        PlainTextResponse,
        StreamingResponse,
    )
    from fastapi.staticfiles import StaticFiles
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    runs = Path(runs_dir)
    runs.mkdir(parents=True, exist_ok=True)
    roots = Roots(runs, [Path(p) for p in data_roots])
    policy = Policy(host, token, extra_hosts)
    env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape())
    ui_dir = roots.runs_dir / UI_DIR
    from tuneforge.ui.chat import ServePool

    pool = ServePool(ui_dir / "serve")

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        yield
        pool.close()

    app = FastAPI(title="tuneforge ui", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.roots, app.state.policy, app.state.pool = roots, policy, pool
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    @app.middleware("http")
    async def guard(request: Request, call_next):
        headers = {k.lower(): v for k, v in request.headers.items()}
        query_token = request.query_params.get("token")
        why = policy.refusal(request.method, headers, query_token)
        if why:
            return PlainTextResponse(why, status_code=403)
        response = await call_next(request)
        if policy.token and query_token and policy.token_ok(query_token):
            response.set_cookie(TOKEN_COOKIE, query_token, httponly=True, samesite="strict")
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        return response

    @app.exception_handler(UserError)
    async def user_error(request: Request, exc: UserError):
        return JSONResponse({"error": str(exc)}, status_code=400)

    def page(name: str, **context):
        template = env.get_template(name)
        return HTMLResponse(template.render(nav=NAV, runs_dir=str(roots.runs_dir),
                                            data_roots=[str(p) for p in roots.data_roots], **context))

    for path, template in PAGES.items():
        def view(request: Request, _template=template, _path=path):
            return page(_template, path=_path, query=dict(request.query_params))
        app.add_api_route(path, view, methods=["GET"], response_class=HTMLResponse, include_in_schema=False)

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon():
        from fastapi.responses import Response

        return Response(status_code=204)

    # ------------------------------------------------------------------ runs

    def all_jobs() -> list[dict]:
        return jobs.list_jobs(roots.runs_dir)

    def run_dir_of(run_id: str, must_be_run: bool = True) -> Path:
        path = roots.run_dir(run_id)
        if must_be_run and not is_run_dir(path) and not (path / "tuneforge_run.json").is_file():
            raise UserError(f"no run {run_id!r} under {roots.runs_dir}")
        return path

    @app.get("/api/runs")
    def api_runs():
        return {"runs": [r.to_json() for r in list_runs(roots.runs_dir, all_jobs())], "time": time.time()}

    @app.get("/api/run")
    def api_run(id: str):
        path = run_dir_of(id)
        detail = run_detail(roots.runs_dir, path)
        detail["jobs"] = [j for j in all_jobs() if j.get("run_dir") and Path(j["run_dir"]).resolve() == path][:5]
        return detail

    @app.get("/api/run/metrics")
    def api_metrics(id: str, offset: int = 0):
        path = roots.run_dir(id)
        events, end = read_metrics(path, max(0, offset))
        return {"events": events, "offset": end}

    @app.get("/run/report")
    def run_report(id: str):
        path = run_dir_of(id) / RUN_REPORT
        if not path.is_file():
            raise UserError(f"{id}: no report yet (press 'Write report')")
        return FileResponse(path, media_type="text/html")

    @app.post("/api/run/stop")
    def api_stop(body: dict):
        path = run_dir_of(body.get("id", ""))
        pid = jobs.stop_run(path, all_jobs())
        return {"stopped": pid, "message": f"SIGTERM sent to pid {pid}: the run saves a checkpoint and stops"}

    @app.post("/api/run/resume")
    def api_resume(body: dict):
        path = run_dir_of(body.get("id", ""))
        if jobs.lock_holder(path) is not None:
            raise UserError(f"{path.name} is running")
        job = jobs.start_job(roots.runs_dir, "resume", ["train", str(path / RUN_CONFIG), "--resume"], run_dir=path,
                             title=f"resume {path.name}")
        return {"job": job}

    @app.post("/api/run/eval")
    def api_run_eval(body: dict):
        path = run_dir_of(body.get("id", ""))
        data = body.get("data") or ((read_yaml(path / RUN_CONFIG) or {}).get("data") or {}).get("eval")
        if not data:
            raise UserError("Eval data: give a data file (the run has no data.eval)")
        return {"job": start_eval([path], str(data), body.get("metrics") or "ppl", body.get("limit"))}

    @app.post("/api/run/report")
    def api_write_report(body: dict):
        path = run_dir_of(body.get("id", ""))
        job = jobs.start_job(roots.runs_dir, "report", ["report", str(path), "--no-samples"], run_dir=None,
                             title=f"report {path.name}")
        return {"job": job}

    # ------------------------------------------------------------------ new run

    @app.get("/api/form")
    def api_form():
        return forms.form_fields()

    def checked(body: dict) -> dict:
        return forms.check(body.get("values") or {}, body.get("widgets") or {}, body.get("extra") or "", roots)

    def public(result: dict) -> dict:
        return {k: v for k, v in result.items() if not k.startswith("_")}

    @app.post("/api/validate")
    def api_validate(body: dict):
        return public(checked(body))

    @app.post("/api/estimate")
    def api_estimate(body: dict):
        result = checked(body)
        if not result["ok"]:
            return {"error": "fix the config first", "errors": result["errors"]}
        gpu = body.get("gpu_mem")
        return forms.estimate(result["_cfg"], float(gpu) if gpu not in (None, "") else None)

    @app.post("/api/preview")
    def api_preview(body: dict):
        result = checked(body)
        if not result["ok"]:
            return {"error": "fix the config first", "errors": result["errors"]}
        return {"html": forms.preview(result["yaml"], ui_dir / "tmp")}

    @app.post("/api/start")
    def api_start(body: dict):
        result = checked(body)
        if not result["ok"]:
            return JSONResponse(public(result), status_code=400)
        cfg = result["_cfg"]
        out = Path(cfg.output_dir).resolve()
        if out.exists() and any(out.iterdir()):
            raise UserError(f"run_name: {out} already exists — choose another run name")
        configs = ui_dir / "configs"
        configs.mkdir(parents=True, exist_ok=True)
        path = configs / f"{cfg.run_name}-{time.strftime('%Y%m%d-%H%M%S')}.yaml"
        path.write_text(result["yaml"], encoding="utf-8")
        job = jobs.start_job(roots.runs_dir, "train", ["train", str(path)], run_dir=out,
                             title=f"train {cfg.run_name}", extra={"stage": cfg.stage, "method": cfg.method.name})
        return {"job": job, "run": out.relative_to(roots.runs_dir).as_posix() if out.is_relative_to(roots.runs_dir)
                else out.name}

    # ------------------------------------------------------------------ jobs

    @app.get("/api/jobs")
    def api_jobs():
        return {"jobs": all_jobs()}

    @app.get("/api/job")
    def api_job(id: str):
        job = jobs.load_job(roots.runs_dir, id)
        if job is None:
            raise UserError(f"no job {id!r}")
        job["log_tail"] = jobs.log_tail(job)
        job["result"] = job_result(job)
        return job

    @app.post("/api/job/stop")
    def api_job_stop(body: dict):
        job = jobs.load_job(roots.runs_dir, body.get("id", ""))
        if job is None:
            raise UserError(f"no job {body.get('id')!r}")
        return {"stopped": jobs.stop_job(job)}

    def job_result(job: dict) -> Any:
        """What a finished job produced: eval table, export/merge report, abtest sheet id."""
        if job.get("returncode") != 0:
            return None
        if job["kind"] == "eval" and job.get("out"):
            return read_json(Path(job["out"]))
        if job["kind"] in ("export", "merge") and job.get("out"):
            for name in ("export_report.json", "merge_report.json", "gguf_report.json"):
                report = read_json(Path(job["out"]) / name)
                if report is not None:
                    return {"file": name, "report": report}
            return {"file": None, "report": None}
        return None

    # ------------------------------------------------------------------ compare: eval and A/B

    def start_eval(paths: list[Path], data: str, metrics: str, limit: Any) -> dict:
        if not re.fullmatch(r"[\w,\-.]+", metrics or ""):
            raise UserError(f"metrics: {metrics!r} is not a comma list of metric names")
        args = ["eval", *map(str, paths), "--metrics", metrics]
        if data:
            args += ["--data", str(roots.confine(data, "data", must_exist=True))]
        if limit not in (None, ""):
            args += ["--limit", str(int(limit))]
        folder = ui_dir / "evals"
        folder.mkdir(parents=True, exist_ok=True)
        out = folder / f"eval-{time.strftime('%Y%m%d-%H%M%S')}-{len(paths)}.json"
        args += ["--out", str(out)]
        names = ", ".join(p.name for p in paths)
        return jobs.start_job(roots.runs_dir, "eval", args, title=f"eval {names} ({metrics})",
                              extra={"out": str(out), "models": [str(p) for p in paths]})

    def target_path(target: str) -> tuple[str, str]:
        """``run:ID`` / ``base:ID`` → (display name, model path or hub id)."""
        kind, _, run_id = target.partition(":")
        path = run_dir_of(run_id)
        if kind == "run":
            return run_id, str(path)
        if kind == "base":
            if (path / RUN_BASE).is_dir():
                return f"base of {run_id}", str(path / RUN_BASE)
            cfg = read_yaml(path / RUN_CONFIG) or {}
            base = (cfg.get("model") or {}).get("name_or_path")
            if not base:
                raise UserError(f"{run_id}: its base model is not recorded")
            return f"base of {run_id}", str(base)
        raise UserError(f"unknown model {target!r} (run:ID or base:ID)")

    @app.post("/api/eval")
    def api_eval(body: dict):
        targets = body.get("runs") or []
        if not targets:
            raise UserError("runs: choose at least one run")
        paths = [Path(target_path(t if ":" in t else f"run:{t}")[1]) for t in targets]
        return {"job": start_eval(paths, body.get("data") or "", body.get("metrics") or "ppl", body.get("limit"))}

    @app.get("/api/targets")
    def api_targets():
        out = []
        for info in list_runs(roots.runs_dir, all_jobs()):
            if info.kind in ("study",) or not info.has_final:
                continue
            out.append({"id": f"run:{info.id}", "label": f"{info.id} (tuned)"})
            out.append({"id": f"base:{info.id}", "label": f"{info.id} — its base"})
        return {"targets": out}

    @app.post("/api/abtest")
    def api_abtest(body: dict):
        a, b = target_path(body.get("a", "")), target_path(body.get("b", ""))
        prompts = roots.confine(body.get("prompts") or "", "prompts", must_exist=True)
        sheet_id = time.strftime("%Y%m%d-%H%M%S")
        folder = ui_dir / "abtest" / sheet_id
        folder.mkdir(parents=True, exist_ok=True)
        args = ["abtest", a[1], b[1], "--prompts", str(prompts), "--out", str(folder / "sheet.html")]
        if body.get("limit") not in (None, ""):
            args += ["--limit", str(int(body["limit"]))]
        if body.get("max_new_tokens") not in (None, ""):
            args += ["--max-new-tokens", str(int(body["max_new_tokens"]))]
        job = jobs.start_job(roots.runs_dir, "abtest", args, title=f"A/B {a[0]} vs {b[0]}",
                             extra={"sheet": sheet_id})
        return {"job": job, "sheet": sheet_id}

    votes_lock = threading.Lock()

    def sheet_folder(sheet: str) -> Path:
        if not re.fullmatch(r"[\w-]+", sheet or ""):
            raise UserError(f"no A/B sheet {sheet!r}")
        return ui_dir / "abtest" / sheet

    def load_key(sheet: str) -> dict:
        key = read_json(sheet_folder(sheet) / "sheet.key.json")
        if not isinstance(key, dict):
            raise UserError(f"A/B sheet {sheet} is not ready (its answers are still being generated)")
        return key

    def read_votes(folder: Path) -> dict[str, str]:
        import json

        votes = {}
        path = folder / "votes.jsonl"
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    row = json.loads(line)
                    votes[row["item"]] = row["vote"]
        return votes

    @app.get("/api/abtest")
    def api_abtest_items(sheet: str):
        key = load_key(sheet)
        votes = read_votes(sheet_folder(sheet))
        # the key's side mapping and model names never leave the server
        items = [{"id": it["id"], "prompt": it["prompt"], "left": it["answer_left"], "right": it["answer_right"],
                  "vote": votes.get(it["id"])} for it in key["items"]]
        return {"sheet": sheet, "items": items, "voted": len(votes)}

    @app.get("/api/abtest/sheets")
    def api_abtest_sheets():
        folder = ui_dir / "abtest"
        sheets = sorted((p.name for p in folder.iterdir() if (p / "sheet.key.json").is_file()), reverse=True) \
            if folder.is_dir() else []
        return {"sheets": sheets}

    @app.post("/api/abtest/vote")
    def api_vote(body: dict):
        from tuneforge.evaluate.abtest import VOTES, write_votes

        sheet, item, vote = body.get("sheet", ""), body.get("item"), body.get("vote")
        key = load_key(sheet)
        if item not in {it["id"] for it in key["items"]}:
            raise UserError(f"item {item!r} is not on sheet {sheet}")
        if vote not in VOTES:
            raise UserError(f"vote must be one of {', '.join(VOTES)}")
        folder = sheet_folder(sheet)
        with votes_lock:  # quick clicks arrive as concurrent requests: no vote may overwrite another
            votes = read_votes(folder)
            votes[item] = vote
            write_votes(folder / "votes.jsonl", [{"sheet_id": key["sheet_id"], "item": i, "vote": v, "rater": "ui"}
                                                 for i, v in votes.items()])
        return {"voted": len(votes), "total": len(key["items"])}

    @app.get("/api/abtest/score")
    def api_score(sheet: str):
        from tuneforge.evaluate.abtest import score_files

        folder = sheet_folder(sheet)
        load_key(sheet)
        if not read_votes(folder):
            raise UserError("no votes yet")
        result = score_files(folder / "sheet.key.json", [folder / "votes.jsonl"], allow_partial=True)
        return result.to_dict()

    # ------------------------------------------------------------------ merge / export

    @app.get("/api/export/options")
    def api_export_options():
        return {"quantize": export_choices()}

    @app.post("/api/export")
    def api_export(body: dict):
        run_id = body.get("id", "")
        source = run_dir_of(run_id)
        action = body.get("action", "export")
        name = body.get("name") or f"{source.name}-{(body.get('quantize') or 'merged').replace(':', '-')}"
        out = roots.confine(str(roots.runs_dir / name), "name", runs_only=True)
        args: list[str]
        if action == "merge":
            args = ["merge", str(source), "--out", str(out)]
        elif action == "export":
            choice = body.get("quantize") or ""
            allowed = [c["value"] for c in export_choices()]
            if choice not in allowed:
                raise UserError(f"quantize: {choice!r} is not one of {', '.join(allowed)}")
            fmt, _, quantize = choice.partition(":")
            args = ["export", str(source), "--quantize", quantize, "--out", str(out)]
            if fmt != "hf":
                args += ["--format", fmt]
            if body.get("data") and fmt == "hf":
                args += ["--data", str(roots.confine(body["data"], "data", must_exist=True))]
        else:
            raise UserError(f"action: {action!r} (merge or export)")
        if body.get("force"):
            args.append("--force")
        job = jobs.start_job(roots.runs_dir, action, args, title=f"{action} {source.name} → {out.name}",
                             extra={"out": str(out)})
        return {"job": job}

    # ------------------------------------------------------------------ search studies

    @app.get("/api/studies")
    def api_studies():
        rows = list_runs(roots.runs_dir, all_jobs())
        studies = []
        for row in rows:
            if row.kind != "study":
                continue
            trials = []
            for trial in rows:
                if trial.kind == "trial" and trial.id.startswith(row.id + "/"):
                    summary = read_json(roots.runs_dir / trial.id / "summary.json") or {}
                    trials.append({**trial.to_json(), "eval_loss": summary.get("best_eval_loss",
                                                                             summary.get("eval_loss"))})
            scored = [t for t in trials if t["eval_loss"] is not None]
            best = min(scored, key=lambda t: t["eval_loss"]) if scored else None
            folder = roots.runs_dir / row.id
            studies.append({"id": row.id, "trials": trials, "best": best and best["id"],
                            "files": [f for f in STUDY_FILES if (folder / f).is_file()]})
        return {"studies": studies}

    @app.get("/study/file")
    def study_file(id: str, name: str):
        if name not in STUDY_FILES:
            raise UserError(f"{name!r} is not a study file")
        path = roots.run_dir(id) / name
        if not path.is_file():
            raise UserError(f"{id}/{name} does not exist")
        return FileResponse(path, media_type="text/html" if name.endswith(".html") else "text/plain")

    # ------------------------------------------------------------------ chat

    @app.post("/api/chat")
    async def api_chat(body: dict):
        import asyncio

        from tuneforge.ui.chat import stream_chat

        targets = body.get("targets") or []
        target = body.get("target")
        if target not in targets or not 1 <= len(targets) <= 2:
            raise UserError("targets: choose one or two models; target must be one of them")
        models = {}
        for t in targets:
            models[_serve_name(t)] = target_path(t)[1]
        messages = [m for m in body.get("messages") or [] if m.get("role") in ("user", "assistant")
                    and isinstance(m.get("content"), str)]
        if body.get("system"):
            messages = [{"role": "system", "content": str(body["system"])}, *messages]
        if not messages or messages[-1]["role"] != "user":
            raise UserError("Message: write a message first")
        sampling = {}
        for key, cast in (("temperature", float), ("top_p", float), ("max_tokens", int)):
            if body.get(key) not in (None, ""):
                try:
                    sampling[key] = cast(body[key])
                except (TypeError, ValueError):
                    raise UserError(f"{key}: {body[key]!r} is not a number") from None
        server = await asyncio.to_thread(pool.get, models)
        return StreamingResponse(stream_chat(server, _serve_name(target), messages, sampling),
                                 media_type="text/event-stream")

    return app


def _serve_name(target: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", target).strip("-")


def export_choices() -> list[dict]:
    """What ``tuneforge export`` can write, as ``{"value": "FORMAT:TYPE", "label"}``: the HF int8/int4 types and,
    when the command has ``--format gguf``, the GGUF types (read from the command's own parser and modules, so the
    form follows the command)."""
    import argparse

    from tuneforge.merge.cli import add_commands
    from tuneforge.merge.export import QUANTIZE

    sub = argparse.ArgumentParser().add_subparsers()
    add_commands(sub)
    export = sub.choices.get("export")
    formats = ["hf"]
    for option in export._actions if export else []:
        if "--format" in option.option_strings:
            formats = list(option.choices or formats)
    out = [{"value": f"hf:{q}", "label": f"{q} (HF, bitsandbytes; perplexity delta)"} for q in QUANTIZE]
    if "gguf" in formats:
        try:
            from tuneforge.merge.gguf import QUANT_TYPES
        except ImportError:  # pragma: no cover - a tree without the GGUF writer
            QUANT_TYPES = ()
        out += [{"value": f"gguf:{q}", "label": f"{q} (GGUF + Ollama Modelfile; reload gate)"} for q in QUANT_TYPES]
    return out
