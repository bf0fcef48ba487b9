#!/usr/bin/env python3
"""Compares two MLflow tracking servers field by field, over their REST API only.

    python check.py SOURCE_URL TARGET_URL [--history get-history|bulk] [--workers N]

URLs are `http://HOST:PORT` (a `mlflow+` prefix, as ferry spells them, is
dropped). It is independent of ferry: it knows MLflow's REST API and nothing
of how ferry copies; it needs only `requests` (every MLflow environment has it).

What must be equal (every difference is listed, the first 50 in the report):
- experiments, matched by name: id (unless `--experiment-ids-may-differ`),
  lifecycle stage, tags;
- runs, matched by the target's `ferry.source_run_id` tag when it has one,
  else by experiment + run name + start time: name, user, status, start and
  end time, lifecycle stage, params, tags (keys starting with `ferry.` are
  ferry's own and ignored; a tag whose value is a source run id, such as
  `mlflow.parentRunId`, must hold the matching target run's id), every
  metric's full history (every step, timestamp and value; NaN equals NaN),
  dataset inputs; a target run that no source run matched (a duplicate, say)
  is a difference;
- registered models and prompts: description, tags, aliases (alias ->
  version number);
- model versions and prompt versions, by model name and version number (so a
  gap left by a deleted version must be there too): stage, description,
  tags, status, run id (mapped), source and run link (run id mapped; a
  source inside the run's artifact directory must be inside the matching
  target run's);
- on servers that have them (3.x): logged models, matched by experiment +
  name (or the target's `ferry.source_model_id` tag): status, type, tags,
  params, metrics, source run (mapped). A server without these endpoints
  (2.x) counts as having none;
- traces, on both versions (2.x: `GET /api/2.0/mlflow/traces` and each
  trace's `traces.json` through `get-trace-artifact`; 3.x: `traces/search`
  and `traces/get`), read into one shape so a 2.x trace and its 3.x copy
  compare: matched by trace id, else by the target's `ferry.source_trace_id`
  tag, else by experiment + request time + name: experiment, request time
  (ms), duration (ms), state, previews (2.x: the trace data's request and
  response, as MLflow's own v2 -> v3 conversion takes them), metadata (a
  source run id mapped), tags, assessments (3.x: every field, ids and
  times included; 2.x has none), and every span (span and parent ids, name,
  start and end in ns, status and its message, attributes decoded from
  either encoding, events). Where the server keeps spans (the
  `mlflow.artifactLocation` and `mlflow.trace.spansLocation` tags) is not
  compared, nor `mlflow.trace.infoFinalized` (a 3.x server's flag that its
  start_trace ran, on every trace it holds, never on 2.x); metadata a 3.x
  server computes (`mlflow.trace.sizeStats`, `.sizeBytes`) only when the
  source has it. A span attribute repeating the trace's own id counts as equal.

Not failures, reported under "fidelity": what MLflow's REST API gives a
writer no way to set (experiment creation times, model and version creation
times, artifact locations, which embed the server's own ids), and tags
starting with `_mlflow_` (MLflow's internal bookkeeping, which 3.x servers
add to prompts). Infinities: MLflow's SQL stores keep +-inf as
+-1.7976931348623157e308 (the largest double), so that value and infinity
compare equal; how many were seen is reported.

Prints one JSON report {"equal", "differences", "counts", "fidelity"} and
exits 0 when equal, 1 when not, 2 when a server could not be read.
"""

import argparse
import base64
import concurrent.futures
import datetime
import json
import math
import sys
import time

import requests

MAX_DIFFERENCES = 50
MAX_FLOAT = sys.float_info.max
IGNORED_TAG_PREFIX = "ferry."
INTERNAL_TAG_PREFIX = "_mlflow_"
SOURCE_RUN_ID_TAG = "ferry.source_run_id"
SOURCE_MODEL_ID_TAG = "ferry.source_model_id"
# Tags that hold the server's own ids or paths (the trace's artifact folder),
# or where it keeps the spans.
TRACE_LOCATION_TAGS = {"mlflow.artifactLocation", "mlflow.trace.spansLocation"}
# Trace metadata a 3.x server computes for itself: compared only when the
# source has it.
SERVER_TRACE_METADATA = {"mlflow.trace.sizeStats", "mlflow.trace.sizeBytes"}
# A 3.x server's own flag that its start_trace has run: every trace it
# holds has it, no 2.x server writes it; never compared.
TRACE_FINALIZED_METADATA = "mlflow.trace.infoFinalized"
SOURCE_TRACE_ID_TAG = "ferry.source_trace_id"
OWN_TRACE_ID = "(the trace's own id)"
PROMPT_FILTER = "tags.`mlflow.prompt.is_prompt` = 'true'"
# Page sizes, within each endpoint's limit on 2.22 and 3.x servers.
EXPERIMENTS_PAGE = 1000
RUNS_PAGE = 1000
EXPERIMENT_IDS_PER_RUN_SEARCH = 100
MODELS_PAGE = 1000
VERSIONS_PAGE = 10_000
HISTORY_PAGE = 25_000
LOGGED_MODELS_PAGE = 100
TRACES_PAGE = 500
BULK_HISTORY_LIMIT = 25_000
BULK_RUNS_PER_REQUEST = 100


class ServerError(Exception):
    pass


class Server:
    """One tracking server, read through its REST API."""

    def __init__(self, url, label):
        if url.startswith("mlflow+"):
            url = url[len("mlflow+") :]
        self.url = url.rstrip("/")
        self.label = label
        self.session = requests.Session()
        self.requests = 0

    def get(self, path, params, api="api", version="2.0", optional=False):
        return self._request("GET", path, api, version, optional, params=params)

    def post(self, path, body, version="2.0", optional=False):
        return self._request("POST", path, "api", version, optional, json=body)

    def _request(self, method, path, api, version, optional, **arguments):
        """The answer's JSON; None for an `optional` endpoint the server lacks (404)."""
        url = f"{self.url}/{api}/{version}/mlflow/{path}"
        for attempt in range(5):
            self.requests += 1
            try:
                response = self.session.request(method, url, timeout=120, **arguments)
            except requests.RequestException as error:
                if attempt == 4:
                    raise ServerError(f"{self.label} {method} {url}: {error}") from error
                time.sleep(0.2 * 2**attempt)
                continue
            if response.status_code in (429, 502, 503, 504) and attempt < 4:
                time.sleep(0.2 * 2**attempt)
                continue
            if response.status_code == 404 and optional and (
                "RESOURCE_DOES_NOT_EXIST" not in response.text or "Trace data not found" in response.text
            ):
                return None
            if response.status_code != 200:
                raise ServerError(
                    f"{self.label} {method} {url} answered {response.status_code}: {response.text[:500]}"
                )
            # Python's json reads the bare NaN the bulk endpoint writes.
            return response.json()
        raise AssertionError("unreachable")

    def paged(self, method, path, request, items, page_size, version="2.0", optional=False):
        """Every item of a paged search: `items` is the list's field name.
        An `optional` search the server lacks yields nothing."""
        token = None
        while True:
            page = dict(request, max_results=page_size)
            if token:
                page["page_token"] = token
            if method == "GET":
                answer = self.get(path, page, version=version, optional=optional)
            else:
                answer = self.post(path, page, version=version, optional=optional)
            if answer is None:
                return
            yield from answer.get(items, [])
            token = answer.get("next_page_token")
            if not token:
                return


class Snapshot:
    """Everything one server holds that the checker compares."""

    def __init__(self, server, history, workers):
        self.server = server
        self.experiments = {}  # name -> experiment
        self.runs = {}  # run id -> run (info, params, tags, metric keys, inputs)
        self.models = {}  # name -> registered model (prompts too)
        self.versions = {}  # (name, version) -> model version
        self.histories = {}  # (run id, key) -> [(step, timestamp, value)]
        self.logged_models = {}  # model id -> logged model (info, data)
        self.traces = {}  # trace id -> {"info", "spans"}, one shape for 2.x and 3.x
        self.max_floats = 0
        self._read(history, workers)

    def _read(self, history, workers):
        server = self.server
        for experiment in server.paged(
            "GET", "experiments/search", {"view_type": "ALL"}, "experiments", EXPERIMENTS_PAGE
        ):
            self.experiments[experiment["name"]] = experiment
        ids = sorted((experiment["experiment_id"] for experiment in self.experiments.values()), key=_id_order)
        for start in range(0, len(ids), EXPERIMENT_IDS_PER_RUN_SEARCH):
            request = {"experiment_ids": ids[start : start + EXPERIMENT_IDS_PER_RUN_SEARCH], "run_view_type": "ALL"}
            for run in server.paged("POST", "runs/search", request, "runs", RUNS_PAGE):
                data = run.get("data", {})
                self.runs[run["info"]["run_id"]] = {
                    "info": run["info"],
                    "params": _pairs(data.get("params")),
                    "tags": _pairs(data.get("tags")),
                    "metric_keys": sorted({metric["key"] for metric in data.get("metrics", [])}),
                    "inputs": _dataset_inputs(run.get("inputs", {})),
                }
        models = list(server.paged("GET", "registered-models/search", {}, "registered_models", MODELS_PAGE))
        # Prompts are registered models that every search leaves out unless
        # asked for by their tag.
        models += server.paged(
            "GET", "registered-models/search", {"filter": PROMPT_FILTER}, "registered_models", MODELS_PAGE
        )
        for model in models:
            self.models[model["name"]] = model
        versions = list(server.paged("GET", "model-versions/search", {}, "model_versions", VERSIONS_PAGE))
        versions += server.paged(
            "GET", "model-versions/search", {"filter": PROMPT_FILTER}, "model_versions", VERSIONS_PAGE
        )
        for version in versions:
            self.versions[(version["name"], version["version"])] = version
        self._read_histories(history, workers)
        self._read_logged_models_and_traces(ids)

    def _read_logged_models_and_traces(self, experiment_ids):
        """3.x's logged models and traces (a 2.x server has neither endpoint)."""
        server = self.server
        for start in range(0, len(experiment_ids), EXPERIMENT_IDS_PER_RUN_SEARCH):
            chunk = experiment_ids[start : start + EXPERIMENT_IDS_PER_RUN_SEARCH]
            request = {"experiment_ids": chunk}
            for model in server.paged("POST", "logged-models/search", request, "models", LOGGED_MODELS_PAGE, optional=True):
                self.logged_models[model["info"]["model_id"]] = model
        self._read_traces(experiment_ids)

    def _read_traces(self, experiment_ids):
        """Traces of both versions, in one shape (see `_trace_v2`, `_trace_v3`)."""
        server = self.server
        if not experiment_ids:
            return
        probe = {"locations": [_location(experiment_ids[0])], "max_results": 1}
        v3 = server.post("traces/search", probe, version="3.0", optional=True) is not None
        for experiment_id in experiment_ids:
            if v3:
                request = {"locations": [_location(experiment_id)]}
                for info in server.paged("POST", "traces/search", request, "traces", TRACES_PAGE, version="3.0"):
                    answer = server.get("traces/get", {"trace_id": info["trace_id"], "allow_partial": "true"}, version="3.0")
                    self.traces[info["trace_id"]] = _trace_v3(answer["trace"])
            else:
                request = {"experiment_ids": [experiment_id]}
                for info in server.paged("GET", "traces", request, "traces", TRACES_PAGE):
                    data = server.get("get-trace-artifact", {"request_id": info["request_id"]}, api="ajax-api", optional=True)
                    self.traces[info["request_id"]] = _trace_v2(info, data)

    def _read_histories(self, history, workers):
        wanted = [(run_id, key) for run_id, run in self.runs.items() for key in run["metric_keys"]]
        if history == "bulk":
            wanted = self._read_bulk(wanted)
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            for (run_id, key), points in zip(wanted, pool.map(lambda item: self._history(*item), wanted)):
                self.histories[(run_id, key)] = points

    def _history(self, run_id, key):
        """A run's full history of one metric, by paged get-history (a 2.x server
        ignores the page size and answers everything at once)."""
        request = {"run_id": run_id, "metric_key": key}
        points = self.server.paged("GET", "metrics/get-history", request, "metrics", HISTORY_PAGE)
        return self._points(points)

    def _read_bulk(self, wanted):
        """Histories through the UI's bulk endpoint (one metric, up to 100 runs
        a request, at most 25,000 points an answer); returns what it could
        not read completely, for get-history."""
        runs_by_key = {}
        for run_id, key in wanted:
            runs_by_key.setdefault(key, []).append(run_id)
        left = []
        for key, run_ids in sorted(runs_by_key.items()):
            for start in range(0, len(run_ids), BULK_RUNS_PER_REQUEST):
                chunk = run_ids[start : start + BULK_RUNS_PER_REQUEST]
                answer = self.server.get(
                    "metrics/get-history-bulk",
                    {"run_id": chunk, "metric_key": key, "max_results": BULK_HISTORY_LIMIT},
                    api="ajax-api",
                    optional=True,
                )
                if answer is None or len(answer.get("metrics", [])) >= BULK_HISTORY_LIMIT:
                    # Missing, or cut at its limit: ask run by run.
                    left += [(run_id, key) for run_id in chunk]
                    continue
                by_run = {run_id: [] for run_id in chunk}
                for metric in answer.get("metrics", []):
                    by_run[metric["run_id"]].append(metric)
                for run_id, points in by_run.items():
                    self.histories[(run_id, key)] = self._points(points)
        return left

    def _points(self, metrics):
        points = []
        for metric in metrics:
            value = _number(metric.get("value", 0.0))
            if math.isfinite(value) and abs(value) == MAX_FLOAT:
                self.max_floats += 1
                value = math.copysign(math.inf, value)
            points.append((int(metric.get("step", 0)), int(metric.get("timestamp", 0)), value))
        points.sort(key=lambda point: (point[0], point[1], _value_order(point[2])))
        return points

    def counts(self):
        runs = self.runs.values()
        prompts = {name for name, model in self.models.items() if _is_prompt(model)}
        return {
            "experiments": len(self.experiments),
            "deleted_experiments": sum(e.get("lifecycle_stage") == "deleted" for e in self.experiments.values()),
            "runs": len(self.runs),
            "deleted_runs": sum(run["info"].get("lifecycle_stage") == "deleted" for run in runs),
            "params": sum(len(run["params"]) for run in runs),
            "tags": sum(len(run["tags"]) for run in runs),
            "metric_keys": len(self.histories),
            "metric_points": sum(len(points) for points in self.histories.values()),
            "dataset_inputs": sum(len(run["inputs"]) for run in runs),
            "registered_models": len(self.models) - len(prompts),
            "model_versions": sum(name not in prompts for name, _ in self.versions),
            "prompts": len(prompts),
            "prompt_versions": sum(name in prompts for name, _ in self.versions),
            "aliases": sum(len(model.get("aliases", [])) for model in self.models.values()),
            "logged_models": len(self.logged_models),
            "traces": len(self.traces),
            "spans": sum(len(trace["spans"]) for trace in self.traces.values()),
            "requests": self.server.requests,
        }


class Comparison:
    def __init__(self, source, target, max_differences, experiment_ids_may_differ=False):
        self.source = source
        self.target = target
        self.max_differences = max_differences
        self.experiment_ids_may_differ = experiment_ids_may_differ
        self.differences = []
        self.difference_count = 0
        self.fidelity = {}
        self.run_map = {}  # source run id -> target run id

    def differ(self, where, field, source_value, target_value):
        self.difference_count += 1
        if len(self.differences) < self.max_differences:
            self.differences.append(
                {"where": where, "field": field, "source": _shown(source_value), "target": _shown(target_value)}
            )

    def tally(self, name, kept):
        entry = self.fidelity.setdefault(name, {"kept": 0, "of": 0})
        entry["of"] += 1
        entry["kept"] += bool(kept)

    def compare(self):
        self.experiments()
        self.match_runs()
        for source_id, target_id in sorted(self.run_map.items()):
            self.run(source_id, target_id)
        self.models()
        self.versions()
        self.logged_models()
        self.traces()
        self.fidelity["infinities_stored_as_max_double"] = {
            "source": self.source.max_floats,
            "target": self.target.max_floats,
        }

    def experiments(self):
        source, target = self.source.experiments, self.target.experiments
        for name in sorted(source.keys() | target.keys()):
            where = f"experiment {name!r}"
            if name not in target:
                self.differ(where, "exists", True, False)
                continue
            if name not in source:
                self.differ(where, "exists", False, True)
                continue
            old, new = source[name], target[name]
            fields = ("lifecycle_stage",) if self.experiment_ids_may_differ else ("experiment_id", "lifecycle_stage")
            for field in fields:
                if old.get(field) != new.get(field):
                    self.differ(where, field, old.get(field), new.get(field))
            self.compare_tags(where, _pairs(old.get("tags")), _pairs(new.get("tags")))
            self.tally("experiment_ids_kept", old.get("experiment_id") == new.get("experiment_id"))
            self.tally("experiment_creation_times_kept", old.get("creation_time") == new.get("creation_time"))
            self.tally("experiment_artifact_locations_same", old.get("artifact_location") == new.get("artifact_location"))

    def match_runs(self):
        """Pairs every source run with at most one target run."""
        target_experiment_names = {e["experiment_id"]: name for name, e in self.target.experiments.items()}
        source_experiment_names = {e["experiment_id"]: name for name, e in self.source.experiments.items()}
        by_tag = {}
        by_identity = {}
        for run_id, run in self.target.runs.items():
            tagged = run["tags"].get(SOURCE_RUN_ID_TAG)
            if tagged:
                by_tag.setdefault(tagged, []).append(run_id)
            else:
                info = run["info"]
                key = (target_experiment_names.get(info["experiment_id"]), info.get("run_name"), info.get("start_time"))
                by_identity.setdefault(key, []).append(run_id)
        matched_by_tag = matched_by_identity = 0
        for run_id, run in sorted(self.source.runs.items(), key=lambda item: _run_order(item[1])):
            info = run["info"]
            candidates = by_tag.get(run_id)
            if candidates:
                matched_by_tag += 1
            else:
                key = (source_experiment_names.get(info["experiment_id"]), info.get("run_name"), info.get("start_time"))
                candidates = by_identity.get(key)
                if candidates:
                    matched_by_identity += 1
            if not candidates:
                self.differ(f"run {_run_label(run)} ({run_id})", "exists", True, False)
                continue
            self.run_map[run_id] = candidates.pop(0)
        extra = [run_id for runs in list(by_tag.values()) + list(by_identity.values()) for run_id in runs]
        for run_id in sorted(extra):
            self.differ(f"run {_run_label(self.target.runs[run_id])} ({run_id})", "exists", False, True)
        self.fidelity["runs_matched_by_source_run_id_tag"] = matched_by_tag
        self.fidelity["runs_matched_by_name_and_start_time"] = matched_by_identity
        self.fidelity["target_runs_not_in_source"] = len(extra)
        self.fidelity["run_ids_kept"] = {
            "kept": sum(source == target for source, target in self.run_map.items()),
            "of": len(self.run_map),
        }

    def run(self, source_id, target_id):
        old, new = self.source.runs[source_id], self.target.runs[target_id]
        where = f"run {_run_label(old)} ({source_id} -> {target_id})"
        old_info, new_info = old["info"], new["info"]
        old_experiment = _experiment_name(self.source, old_info["experiment_id"])
        new_experiment = _experiment_name(self.target, new_info["experiment_id"])
        if old_experiment != new_experiment:
            self.differ(where, "experiment", old_experiment, new_experiment)
        for field in ("run_name", "user_id", "status", "start_time", "end_time", "lifecycle_stage"):
            if old_info.get(field) != new_info.get(field):
                self.differ(where, field, old_info.get(field), new_info.get(field))
        self.tally("run_start_times_kept", old_info.get("start_time") == new_info.get("start_time"))
        self.tally("run_end_times_kept", old_info.get("end_time") == new_info.get("end_time"))
        if old["params"] != new["params"]:
            for key in sorted(old["params"].keys() | new["params"].keys()):
                if old["params"].get(key) != new["params"].get(key):
                    self.differ(where, f"param {key}", old["params"].get(key), new["params"].get(key))
        self.compare_tags(where, old["tags"], new["tags"], map_run_ids=True)
        if old["inputs"] != new["inputs"]:
            self.differ(where, "dataset inputs", old["inputs"], new["inputs"])
        if old["metric_keys"] != new["metric_keys"]:
            self.differ(where, "metric keys", old["metric_keys"], new["metric_keys"])
        for key in old["metric_keys"]:
            self.history(where, key, self.source.histories.get((source_id, key), []), self.target.histories.get((target_id, key), []))

    def history(self, where, key, old, new):
        if len(old) != len(new):
            self.differ(where, f"metric {key} points", len(old), len(new))
        for index, (old_point, new_point) in enumerate(zip(old, new)):
            if not _same_point(old_point, new_point):
                self.differ(where, f"metric {key} point {index} (step, timestamp, value)", old_point, new_point)
                return

    def compare_tags(self, where, old, new, map_run_ids=False):
        old_internal = {key for key in old if key.startswith(INTERNAL_TAG_PREFIX)}
        new_internal = {key for key in new if key.startswith(INTERNAL_TAG_PREFIX)}
        if old_internal != new_internal:
            self.fidelity.setdefault("internal_tags_differing", []).append(
                {"where": where, "source": sorted(old_internal), "target": sorted(new_internal)}
            )
        for key in sorted(old.keys() | new.keys()):
            if key.startswith(IGNORED_TAG_PREFIX) or key.startswith(INTERNAL_TAG_PREFIX):
                continue
            expected = old.get(key)
            if map_run_ids and expected in self.source.runs:
                expected = self.run_map.get(expected, f"(the target's copy of run {expected}, which is missing)")
            if expected != new.get(key):
                self.differ(where, f"tag {key}", expected, new.get(key))

    def models(self):
        source, target = self.source.models, self.target.models
        for name in sorted(source.keys() | target.keys()):
            kind = "prompt" if _is_prompt(source.get(name) or target.get(name)) else "registered model"
            where = f"{kind} {name!r}"
            if name not in target or name not in source:
                self.differ(where, "exists", name in source, name in target)
                continue
            old, new = source[name], target[name]
            if old.get("description", "") != new.get("description", ""):
                self.differ(where, "description", old.get("description", ""), new.get("description", ""))
            self.compare_tags(where, _pairs(old.get("tags")), _pairs(new.get("tags")))
            old_aliases = {alias["alias"]: alias["version"] for alias in old.get("aliases", [])}
            new_aliases = {alias["alias"]: alias["version"] for alias in new.get("aliases", [])}
            if old_aliases != new_aliases:
                self.differ(where, "aliases", old_aliases, new_aliases)
            self.tally("model_creation_times_kept", old.get("creation_timestamp") == new.get("creation_timestamp"))

    def versions(self):
        source, target = self.source.versions, self.target.versions
        for name, version in sorted(source.keys() | target.keys(), key=lambda item: (item[0], int(item[1]))):
            where = f"model version {name!r} {version}"
            if (name, version) not in target or (name, version) not in source:
                self.differ(where, "exists", (name, version) in source, (name, version) in target)
                continue
            old, new = source[(name, version)], target[(name, version)]
            for field in ("current_stage", "description", "status"):
                if old.get(field, "") != new.get(field, ""):
                    self.differ(where, field, old.get(field, ""), new.get(field, ""))
            self.compare_tags(where, _pairs(old.get("tags")), _pairs(new.get("tags")))
            old_run = old.get("run_id", "")
            expected_run = self.run_map.get(old_run, old_run) if old_run else ""
            if expected_run != new.get("run_id", ""):
                self.differ(where, "run_id", expected_run, new.get("run_id", ""))
            for field in ("source", "run_link"):
                expected = self.mapped_location(old.get(field, ""), old_run)
                if expected != new.get(field, ""):
                    self.differ(where, field, expected, new.get(field, ""))
            self.tally("model_version_creation_times_kept", old.get("creation_timestamp") == new.get("creation_timestamp"))

    def logged_models(self):
        def identity(snapshot, model):
            info = model["info"]
            return (_experiment_name(snapshot, info["experiment_id"]), info.get("name"))

        by_tag, by_identity = {}, {}
        for model_id, model in self.target.logged_models.items():
            tagged = _pairs(model["info"].get("tags")).get(SOURCE_MODEL_ID_TAG)
            if tagged:
                by_tag.setdefault(tagged, []).append(model_id)
            else:
                by_identity.setdefault(identity(self.target, model), []).append(model_id)
        for model_id, old in sorted(self.source.logged_models.items()):
            where = f"logged model {old['info'].get('name')!r} ({model_id})"
            candidates = by_tag.get(model_id) or by_identity.get(identity(self.source, old))
            if not candidates:
                self.differ(where, "exists", True, False)
                continue
            new = self.target.logged_models[candidates.pop(0)]
            old_info, new_info = old["info"], new["info"]
            for field in ("status", "model_type"):
                if old_info.get(field, "") != new_info.get(field, ""):
                    self.differ(where, field, old_info.get(field, ""), new_info.get(field, ""))
            old_run = old_info.get("source_run_id", "")
            expected = self.run_map.get(old_run, old_run) if old_run else ""
            if expected != new_info.get("source_run_id", ""):
                self.differ(where, "source_run_id", expected, new_info.get("source_run_id", ""))
            self.compare_tags(where, _pairs(old_info.get("tags")), _pairs(new_info.get("tags")))
            old_data, new_data = old.get("data", {}), new.get("data", {})
            if _pairs(old_data.get("params")) != _pairs(new_data.get("params")):
                self.differ(where, "params", _pairs(old_data.get("params")), _pairs(new_data.get("params")))
            old_metrics = self.model_metrics(old_data.get("metrics"), mapped=True)
            new_metrics = self.model_metrics(new_data.get("metrics"), mapped=False)
            if old_metrics != new_metrics:
                self.differ(where, "metrics", old_metrics, new_metrics)
            self.tally("logged_model_ids_kept", model_id == new_info["model_id"])
        extra = [model_id for ids in list(by_tag.values()) + list(by_identity.values()) for model_id in ids]
        for model_id in sorted(extra):
            self.differ(f"logged model {self.target.logged_models[model_id]['info'].get('name')!r} ({model_id})", "exists", False, True)

    def model_metrics(self, metrics, mapped):
        found = []
        for metric in metrics or []:
            run_id = metric.get("run_id", "")
            if mapped and run_id:
                run_id = self.run_map.get(run_id, run_id)
            value = _number(metric.get("value", 0.0))
            found.append((metric.get("key"), int(metric.get("step", 0)), int(metric.get("timestamp", 0)), repr(value), run_id))
        return sorted(found)

    def traces(self):
        def identity(snapshot, trace):
            info = trace["info"]
            return (_experiment_name(snapshot, info["experiment_id"]), info["request_time_ms"], info["tags"].get("mlflow.traceName"))

        unmatched = dict(self.target.traces)
        by_tag, by_identity = {}, {}
        for trace_id, trace in self.target.traces.items():
            tagged = trace["info"]["tags"].get(SOURCE_TRACE_ID_TAG)
            if tagged:
                by_tag.setdefault(tagged, []).append(trace_id)
            by_identity.setdefault(identity(self.target, trace), []).append(trace_id)
        for trace_id, old in sorted(self.source.traces.items()):
            where = f"trace {trace_id}"
            if trace_id in unmatched:
                new_id = trace_id
            else:
                candidates = [id for id in by_tag.get(trace_id, []) if id in unmatched]
                candidates += [id for id in by_identity.get(identity(self.source, old), []) if id in unmatched]
                if not candidates:
                    self.differ(where, "exists", True, False)
                    continue
                new_id = candidates[0]
            new = unmatched.pop(new_id)
            self.tally("trace_ids_kept", new_id == trace_id)
            old_info, new_info = old["info"], new["info"]
            if _experiment_name(self.source, old_info["experiment_id"]) != _experiment_name(self.target, new_info["experiment_id"]):
                self.differ(where, "experiment", old_info["experiment_id"], new_info["experiment_id"])
            for field in ("request_time_ms", "execution_ms", "state", "request_preview", "response_preview", "client_request_id", "assessments"):
                if old_info.get(field) != new_info.get(field):
                    self.differ(where, field, old_info.get(field), new_info.get(field))
            old_metadata = {
                key: self.mapped_value(value)
                for key, value in old_info["metadata"].items()
                if key != TRACE_FINALIZED_METADATA
            }
            new_metadata = {
                key: value
                for key, value in new_info["metadata"].items()
                if key != TRACE_FINALIZED_METADATA and (key not in SERVER_TRACE_METADATA or key in old_metadata)
            }
            self.compare_tags(where + " metadata", old_metadata, new_metadata)
            old_tags = {key: value for key, value in old_info["tags"].items() if key not in TRACE_LOCATION_TAGS}
            new_tags = {key: value for key, value in new_info["tags"].items() if key not in TRACE_LOCATION_TAGS}
            self.compare_tags(where, old_tags, new_tags, map_run_ids=True)
            if old["spans"] != new["spans"]:
                self.differ(where, "spans", old["spans"], new["spans"])
        for trace_id in sorted(unmatched):
            self.differ(f"trace {trace_id}", "exists", False, True)

    def mapped_value(self, value):
        """A value that is a source run id, as the target should hold it."""
        return self.run_map.get(value, value) if value in self.source.runs else value

    def mapped_location(self, text, run_id):
        """`text` (a source or a run link) as the target should hold it: inside
        the target run's artifact directory if it was inside the source
        run's, with the run's id mapped."""
        if not text or not run_id or run_id not in self.run_map:
            return text
        target_id = self.run_map[run_id]
        old_root = self.source.runs[run_id]["info"].get("artifact_uri", "")
        new_root = self.target.runs[target_id]["info"].get("artifact_uri", "")
        if old_root and text.startswith(old_root):
            return new_root + text[len(old_root) :]
        return text.replace(run_id, target_id)


def _pairs(items):
    return {item["key"]: item.get("value", "") for item in items or []}


def _dataset_inputs(inputs):
    """A run's dataset inputs as a sorted list (the server keeps no order)."""
    found = []
    for item in inputs.get("dataset_inputs", []) or []:
        dataset = item.get("dataset", {})
        found.append(
            {
                "dataset": {field: dataset.get(field, "") for field in ("name", "digest", "source_type", "source", "schema", "profile")},
                "tags": _pairs(item.get("tags")),
            }
        )
    return sorted(found, key=lambda entry: json.dumps(entry, sort_keys=True))


def _location(experiment_id):
    return {"type": "MLFLOW_EXPERIMENT", "mlflow_experiment": {"experiment_id": experiment_id}}


def _trace_v2(info, data):
    """A 2.x trace (its info and its traces.json, None when it has none) in the
    shape both versions are compared in."""
    data = data or {}
    trace_id = info["request_id"]
    state = info.get("status", "")
    return {
        "info": {
            "experiment_id": info.get("experiment_id"),
            "request_time_ms": int(info.get("timestamp_ms") or 0),
            "execution_ms": int(info.get("execution_time_ms") or 0),
            "state": "STATE_UNSPECIFIED" if state in ("", "TRACE_STATUS_UNSPECIFIED") else state,
            "metadata": _pairs(info.get("request_metadata")),
            "tags": _pairs(info.get("tags")),
            "request_preview": data.get("request"),
            "response_preview": data.get("response"),
            "client_request_id": None,
            "assessments": [],
        },
        "spans": sorted((_span_v2(span, trace_id) for span in data.get("spans", [])), key=lambda span: span["span_id"]),
    }


def _span_v2(span, trace_id):
    context = span.get("context", {})
    attributes = {}
    for key, value in (span.get("attributes") or {}).items():
        try:
            attributes[key] = json.loads(value)
        except (TypeError, ValueError):
            attributes[key] = value
    return _span_shape(
        span_id=context.get("span_id"),
        parent=span.get("parent_id"),
        name=span.get("name"),
        start=span.get("start_time"),
        end=span.get("end_time"),
        code=span.get("status_code") or "UNSET",
        message=span.get("status_message") or "",
        attributes=attributes,
        events=[(event.get("name"), int(event.get("timestamp") or 0), event.get("attributes") or {}) for event in span.get("events", [])],
        trace_id=trace_id,
    )


def _trace_v3(trace):
    """A 3.x trace (`traces/get`) in the shape both versions are compared in."""
    info = trace["trace_info"]
    trace_id = info["trace_id"]
    return {
        "info": {
            "experiment_id": info.get("trace_location", {}).get("mlflow_experiment", {}).get("experiment_id"),
            "request_time_ms": _rfc3339_ms(info.get("request_time")),
            "execution_ms": round(float((info.get("execution_duration") or "0s").rstrip("s")) * 1000),
            "state": info.get("state", "STATE_UNSPECIFIED"),
            "metadata": dict(info.get("trace_metadata", {})),
            "tags": dict(info.get("tags", {})),
            "request_preview": info.get("request_preview"),
            "response_preview": info.get("response_preview"),
            "client_request_id": info.get("client_request_id"),
            "assessments": _assessments(info.get("assessments", [])),
        },
        "spans": sorted((_span_v3(span, trace_id) for span in trace.get("spans", [])), key=lambda span: span["span_id"]),
    }


def _assessments(assessments):
    """A 3.x trace's assessments, every field but the trace id (the trace's
    own, compared through the trace), by id."""
    return sorted(
        ({key: value for key, value in assessment.items() if key != "trace_id"} for assessment in assessments),
        key=lambda assessment: assessment.get("assessment_id", ""),
    )


def _span_v3(span, trace_id):
    status = span.get("status") or {}
    return _span_shape(
        span_id=_hex(span.get("span_id")),
        parent=_hex(span.get("parent_span_id")),
        name=span.get("name"),
        start=span.get("start_time_unix_nano"),
        end=span.get("end_time_unix_nano"),
        code=(status.get("code") or "STATUS_CODE_UNSET").replace("STATUS_CODE_", ""),
        message=status.get("message") or "",
        attributes={item["key"]: _any_value(item.get("value")) for item in span.get("attributes", [])},
        events=[
            (
                event.get("name"),
                int(event.get("time_unix_nano") or 0),
                {item["key"]: _any_value(item.get("value")) for item in event.get("attributes", [])},
            )
            for event in span.get("events", [])
        ],
        trace_id=trace_id,
    )


def _span_shape(span_id, parent, name, start, end, code, message, attributes, events, trace_id):
    if attributes.get("mlflow.traceRequestId") == trace_id:
        attributes["mlflow.traceRequestId"] = OWN_TRACE_ID
    return {
        "span_id": span_id,
        "parent_id": parent or None,
        "name": name,
        "start_ns": int(start or 0),
        "end_ns": int(end or 0),
        "status": code,
        "status_message": message,
        "attributes": attributes,
        "events": events,
    }


def _hex(base64_id):
    return base64.b64decode(base64_id).hex() if base64_id else None


def _any_value(value):
    """An OTLP any-value (as MLflow 3.x's traces/get writes it) as a Python value."""
    value = value or {}
    if "string_value" in value:
        return value["string_value"]
    if "int_value" in value:
        return int(value["int_value"])
    if "double_value" in value:
        return float(value["double_value"])
    if "bool_value" in value:
        return bool(value["bool_value"])
    if "array_value" in value:
        return [_any_value(item) for item in value["array_value"].get("values", [])]
    if "kvlist_value" in value:
        return {item["key"]: _any_value(item.get("value")) for item in value["kvlist_value"].get("values", [])}
    if "bytes_value" in value:
        return value["bytes_value"]
    return None


def _rfc3339_ms(text):
    if not text:
        return 0
    moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    return int(moment.timestamp()) * 1000 + moment.microsecond // 1000


def _number(value):
    if isinstance(value, str):
        # get-history's JSON spells NaN and the infinities as strings.
        return float(value)
    return float(value)


def _value_order(value):
    return (1, 0.0) if math.isnan(value) else (0, value)


def _same_point(old, new):
    if old[0] != new[0] or old[1] != new[1]:
        return False
    if math.isnan(old[2]) or math.isnan(new[2]):
        return math.isnan(old[2]) and math.isnan(new[2])
    return old[2] == new[2]


def _is_prompt(model):
    return bool(model) and _pairs(model.get("tags")).get("mlflow.prompt.is_prompt") == "true"


def _id_order(experiment_id):
    return (0, int(experiment_id)) if experiment_id.isdigit() else (1, experiment_id)


def _run_order(run):
    info = run["info"]
    return (info.get("start_time") or 0, info.get("run_name") or "", info["run_id"])


def _run_label(run):
    return repr(run["info"].get("run_name"))


def _experiment_name(snapshot, experiment_id):
    for name, experiment in snapshot.experiments.items():
        if experiment["experiment_id"] == experiment_id:
            return name
    return f"(unknown experiment {experiment_id})"


def _shown(value):
    """A value as JSON can carry it: NaN and infinities spelled out, long text cut."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, tuple):
        return [_shown(item) for item in value]
    if isinstance(value, str) and len(value) > 200:
        return f"{value[:200]}... ({len(value)} characters)"
    if isinstance(value, dict):
        return {key: _shown(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_shown(item) for item in value]
    return value


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source")
    parser.add_argument("target")
    parser.add_argument(
        "--history",
        choices=["get-history", "bulk"],
        default="get-history",
        help="read metric histories by paged get-history (default), or by the UI's bulk endpoint "
        "(100 runs a request; what it may have cut is read by get-history)",
    )
    parser.add_argument("--workers", type=int, default=4, help="concurrent history requests per server")
    parser.add_argument("--max-differences", type=int, default=MAX_DIFFERENCES)
    parser.add_argument(
        "--experiment-ids-may-differ",
        action="store_true",
        help="a target that was not empty: experiments are still matched by name, their ids only counted under fidelity",
    )
    arguments = parser.parse_args()
    started = time.monotonic()
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
            source = pool.submit(Snapshot, Server(arguments.source, "source"), arguments.history, arguments.workers)
            target = pool.submit(Snapshot, Server(arguments.target, "target"), arguments.history, arguments.workers)
            source, target = source.result(), target.result()
    except ServerError as error:
        print(json.dumps({"equal": False, "error": str(error)}))
        return 2
    comparison = Comparison(source, target, arguments.max_differences, arguments.experiment_ids_may_differ)
    comparison.compare()
    report = {
        "equal": comparison.difference_count == 0,
        "difference_count": comparison.difference_count,
        "differences": comparison.differences,
        "counts": {"source": source.counts(), "target": target.counts()},
        "fidelity": comparison.fidelity,
        "seconds": round(time.monotonic() - started, 2),
    }
    print(json.dumps(report, indent=1, sort_keys=True))
    return 0 if report["equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
