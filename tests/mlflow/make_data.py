#!/usr/bin/env python3
"""Fills an MLflow tracking server with the data set ferry's MLflow tests copy.

Run with the Python of an MLflow virtual environment (2.22.5 or 3.17.2):

    MLFLOW_TRACKING_URI=http://127.0.0.1:PORT python make_data.py [--scale N] [--seed S]

Everything goes through MLflow's own Python client (MlflowClient), as a user's
training code would write it, so the server stores what it stores for real
users (NaN carried as MLflow's client carries it, infinities as the server
keeps them...). Every value and every time comes from the seed, so two runs
with the same arguments make the same data set; only the ids the server
assigns (run ids) differ.

What it makes, per `--scale` (1 is small, for tests):
- 1 + 2*scale experiments with tags, and one deleted experiment created
  between them (ids keep counting past it: it holds its id);
- per experiment 1 parent run with 2 nested children and 2*scale plain runs,
  with run names, user ids, explicit start and end times, every status
  (FINISHED, FAILED, KILLED, RUNNING; a RUNNING run has no end time), params
  (one run has a 6,000-character value), tags, and dataset inputs;
- one deleted run;
- metrics with every edge: NaN, +inf, -inf, negative values, many steps, the
  same step logged twice with different timestamps; one key has 25,001
  points (logged in batches of 1,000);
- registered models with descriptions and tags, versions tied to runs
  (`runs:/` sources and the run's artifact URI), a version without a run,
  a deleted version (so numbers have a gap), aliases and stages;
- a prompt (two versions) from MLflow's prompt registry.

`--traces` adds traces made with MLflow's tracing API (`mlflow.start_span`,
on either version): nested spans with attributes of every JSON type, inputs
and outputs, trace tags, a span that raises (an ERROR trace with an
exception event), and a trace made inside a run (linked to it). Their ids
and times are the server's and the clock's, not the seed's.

`--v3-extras` (3.x servers only) adds a logged model, and the traces.

`--assessments` (3.x servers only) adds the traces, and on the first one a
feedback (a number, a rationale, a human source, metadata) and an
expectation (a JSON object), with MLflow's `log_feedback` and
`log_expectation`: what MLflow 2.x cannot keep.

It ends by printing a JSON summary of what it made.
"""

import argparse
import contextlib
import json
import math
import random
import sys
import warnings

import mlflow
from mlflow import MlflowClient
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag

# 2023-11-14T22:13:20Z: all the data set's times count from here, so they
# are the same on every machine and every day.
BASE_TIME_MS = 1_700_000_000_000
USERS = ["alice", "bob", "carol@example.com"]
STATUSES = ["FINISHED", "FAILED", "KILLED", "RUNNING"]
# The server's limit for one log-batch request.
METRICS_PER_BATCH = 1000
PARAMS_PER_BATCH = 100
# A long metric history: more than the 25,000 points MLflow's bulk history
# endpoint returns at most, so a reader that trusts it loses points.
LONG_HISTORY_POINTS = 25_001
LONG_PARAM_LENGTH = 6000


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=int, default=1, help="size of the data set (1: small)")
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument(
        "--v3-extras",
        action="store_true",
        help="also make what only 3.x servers hold: a logged model, traces",
    )
    parser.add_argument(
        "--traces",
        action="store_true",
        help="also make traces (2.x and 3.x)",
    )
    parser.add_argument(
        "--assessments",
        action="store_true",
        help="also make traces, and assessments on one of them (3.x only)",
    )
    parser.add_argument(
        "--no-long-history",
        action="store_true",
        help=f"leave out the key with {LONG_HISTORY_POINTS} points (faster)",
    )
    arguments = parser.parse_args()
    if arguments.scale < 1:
        parser.error("--scale must be at least 1")
    # Stages and some registry calls are deprecated on 3.x; they still work.
    warnings.simplefilter("ignore")
    maker = Maker(MlflowClient(), random.Random(arguments.seed), arguments.scale)
    # MLflow's client prints a "View run" line per finished run on stdout;
    # stdout is for the summary.
    with contextlib.redirect_stdout(sys.stderr):
        maker.make(long_history=not arguments.no_long_history)
        if arguments.traces or arguments.v3_extras or arguments.assessments:
            maker.make_traces()
        if arguments.assessments:
            maker.make_assessments()
        if arguments.v3_extras:
            maker.make_v3_extras()
    print(json.dumps(maker.summary, sort_keys=True))


class Maker:
    def __init__(self, client, rng, scale):
        self.client = client
        self.rng = rng
        self.scale = scale
        self.clock_ms = BASE_TIME_MS
        self.summary = {
            "mlflow_client": mlflow.__version__,
            "experiments": 0,
            "deleted_experiments": 0,
            "runs": 0,
            "deleted_runs": 0,
            "nested_runs": 0,
            "params": 0,
            "metric_points": 0,
            "metric_keys": 0,
            "dataset_inputs": 0,
            "registered_models": 0,
            "model_versions": 0,
            "deleted_model_versions": 0,
            "aliases": 0,
            "prompts": 0,
            "prompt_versions": 0,
        }
        self.runs = []

    def tick(self, at_least_ms=1, at_most_ms=5000):
        """The data set's clock: every time it hands out is later than the last."""
        self.clock_ms += self.rng.randint(at_least_ms, at_most_ms)
        return self.clock_ms

    def make(self, long_history):
        experiment_ids = []
        count = 1 + 2 * self.scale
        run_index = 0
        for index in range(count):
            experiment_ids.append(self.experiment(f"ferry-experiment-{index}", index))
            if index == 0:
                # Between live experiments, so the live ones' ids are not
                # contiguous from 1; with a run, which a restore must make
                # before the experiment is deleted (no run can be created in
                # a deleted experiment).
                deleted = self.experiment("ferry-experiment-deleted", 99)
                self.run(deleted, 999, status="FINISHED")
                self.client.delete_experiment(deleted)
                self.summary["deleted_experiments"] += 1
        for experiment_id in experiment_ids:
            parent = self.run(experiment_id, run_index, status="FINISHED")
            run_index += 1
            for _ in range(2):
                self.run(experiment_id, run_index, parent_run_id=parent)
                run_index += 1
                self.summary["nested_runs"] += 1
            for _ in range(2 * self.scale):
                self.run(experiment_id, run_index)
                run_index += 1
        # One run of the first experiment gets the long history and the long
        # param; one run is deleted.
        first_plain = self.runs[4]
        if long_history:
            self.long_history(first_plain["run_id"])
        self.client.log_param(first_plain["run_id"], "long_param", self.text(LONG_PARAM_LENGTH))
        self.summary["params"] += 1
        deleted = self.runs[-1]["run_id"]
        self.client.delete_run(deleted)
        self.summary["deleted_runs"] += 1
        self.models()
        self.prompts()

    def experiment(self, name, index):
        tags = {"team": self.rng.choice(["vision", "speech", "ranking"]), "index": str(index)}
        if index % 2 == 0:
            tags["mlflow.note.content"] = f"experiment {index}: notes with unicode é ✓"
        experiment_id = self.client.create_experiment(name, tags=tags)
        self.summary["experiments"] += 1
        return experiment_id

    def run(self, experiment_id, index, status=None, parent_run_id=None):
        status = status or STATUSES[index % len(STATUSES)]
        start_ms = self.tick(1000, 60_000)
        user = USERS[index % len(USERS)]
        tags = {
            "mlflow.user": user,
            "mlflow.source.type": "LOCAL",
            "mlflow.source.name": "train.py",
            "stage": self.rng.choice(["dev", "prod"]),
            "index": str(index),
        }
        if parent_run_id is not None:
            tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(
            experiment_id, start_time=start_ms, tags=tags, run_name=f"run-{index:04d}"
        )
        run_id = run.info.run_id
        self.summary["runs"] += 1
        params = [Param(f"param_{n}", str(self.rng.choice([0.1, 0.01, 32, "adam", "sgd"]))) for n in range(4)]
        params.append(Param("seed", str(index)))
        self.client.log_batch(run_id, params=params)
        self.summary["params"] += len(params)
        end_ms = self.metrics(run_id, index, start_ms)
        if index % 3 == 0:
            self.dataset_input(run_id, index)
        if status != "RUNNING":
            self.client.set_terminated(run_id, status=status, end_time=end_ms)
        self.runs.append({"run_id": run_id, "index": index, "experiment_id": experiment_id})
        return run_id

    def metrics(self, run_id, index, start_ms):
        """Logs the run's metrics and returns the time of its last point."""
        at = start_ms
        points = []
        steps = 20 * self.scale
        for step in range(steps):
            at += self.rng.randint(1, 2000)
            points.append(Metric("loss", round(2.0 / (step + 1) + self.rng.random() / 10, 6), at, step))
            points.append(Metric("accuracy", round(self.rng.random(), 6), at, step))
        # Every edge of a float, and negative values.
        edges = [float("nan"), float("inf"), float("-inf"), -1.5, 0.0, -0.0, 1e-300, -1e300, 123456789.123]
        for step, value in enumerate(edges):
            at += 1
            points.append(Metric("edge", value, at, step))
        # The same step twice, with different timestamps and values.
        at += 10
        points.append(Metric("same_step", 1.0, at, 5))
        points.append(Metric("same_step", 2.0, at + 7, 5))
        # The same step, timestamp and value twice.
        points.append(Metric("twice", 3.0, at, 1))
        points.append(Metric("twice", 3.0, at, 1))
        # A metric logged once, at step 0 (what mlflow.log_metric does by
        # default), and one at a large step.
        points.append(Metric("final_score", round(self.rng.uniform(-10, 10), 6), at + 20, 0))
        points.append(Metric("big_step", 7.0, at + 21, 2**40 + index))
        self.log_metrics(run_id, points)
        self.summary["metric_keys"] += 7
        return at + 1000

    def long_history(self, run_id):
        at = BASE_TIME_MS
        points = []
        for step in range(LONG_HISTORY_POINTS):
            at += self.rng.randint(1, 3)
            value = float("nan") if step == 12_345 else round(math.sin(step / 100.0), 6)
            points.append(Metric("long_history", value, at, step))
        self.log_metrics(run_id, points)
        self.summary["metric_keys"] += 1

    def log_metrics(self, run_id, points):
        for start in range(0, len(points), METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=points[start : start + METRICS_PER_BATCH])
        self.summary["metric_points"] += len(points)

    def dataset_input(self, run_id, index):
        import pandas as pd

        frame = pd.DataFrame(
            {
                "feature": [self.rng.randint(0, 100) for _ in range(8)],
                "label": [self.rng.choice([0, 1]) for _ in range(8)],
            }
        )
        dataset = mlflow.data.from_pandas(
            frame,
            source=f"https://data.example.com/train-{index % 2}.csv",
            targets="label",
            name=f"train-{index % 2}",
        )
        context = InputTag("mlflow.data.context", "training" if index % 2 == 0 else "eval")
        self.client.log_inputs(run_id, [DatasetInput(dataset._to_mlflow_entity(), tags=[context])])
        self.summary["dataset_inputs"] += 1

    def models(self):
        runs = [run for run in self.runs if run["index"] % 4 == 0]
        model = "ferry-model-a"
        self.client.create_registered_model(
            model, tags={"task": "classification", "owner": "alice"}, description="the first model\nof two lines"
        )
        self.summary["registered_models"] += 1
        versions = []
        for number, run in enumerate(runs[:4], start=1):
            run_id = run["run_id"]
            if number % 2 == 1:
                source = f"runs:/{run_id}/model"
            else:
                source = f"{self.client.get_run(run_id).info.artifact_uri}/model"
            version = self.client.create_model_version(
                model,
                source,
                run_id=run_id,
                tags={"number": str(number), "quality": self.rng.choice(["good", "better"])},
                description=f"version {number}" if number != 3 else None,
            )
            versions.append(version.version)
            self.summary["model_versions"] += 1
        # Version 2 deleted: the next version is still 5, never 2 again.
        self.client.delete_model_version(model, versions[1])
        self.summary["deleted_model_versions"] += 1
        self.client.transition_model_version_stage(model, versions[0], "Archived")
        self.client.transition_model_version_stage(model, versions[2], "Staging")
        self.client.transition_model_version_stage(model, versions[3], "Production")
        self.client.set_registered_model_alias(model, "champion", versions[3])
        self.client.set_registered_model_alias(model, "baseline", versions[0])
        self.summary["aliases"] += 2

        other = "ferry-model-b"
        self.client.create_registered_model(other)
        self.summary["registered_models"] += 1
        # A version that no run made.
        self.client.create_model_version(other, "s3://ferry-external/model-b", description="no run")
        self.summary["model_versions"] += 1
        self.client.set_registered_model_alias(other, "current", "1")
        self.summary["aliases"] += 1
        self.client.set_registered_model_tag(other, "empty", "")

    def prompts(self):
        name = "ferry-prompt"
        self.client.register_prompt(name, "Summarize {{text}} in one line.", commit_message="first")
        self.client.register_prompt(name, "Summarize {{text}} in {{count}} lines.", commit_message="second")
        self.summary["prompts"] += 1
        self.summary["prompt_versions"] += 2

    def make_v3_extras(self):
        """What only a 3.x server holds: a logged model, linked to a run, and traces."""
        run = self.runs[1]
        model = self.client.create_logged_model(
            experiment_id=run["experiment_id"],
            name="ferry-logged-model",
            source_run_id=run["run_id"],
            tags={"framework": "none"},
            params={"alpha": "0.5"},
        )
        # A metric of the model (also a point of its run).
        self.client.log_metric(
            run["run_id"], "model_accuracy", 0.91, timestamp=self.tick(), step=0, model_id=model.model_id
        )
        self.client.finalize_logged_model(model.model_id, "READY")
        self.summary["logged_models"] = 1

    def make_traces(self):
        """Traces through MLflow's tracing API, as an application's code makes them."""
        _let_mlflow_2_export_traces()
        experiment_id = self.runs[1]["experiment_id"]
        mlflow.set_experiment(experiment_id=experiment_id)
        for number in range(2):
            with mlflow.start_span(name=f"ferry-trace-{number}", span_type="CHAIN") as span:
                span.set_inputs({"question": f"q{number}", "history": [1, 2.5, None, True]})
                mlflow.update_current_trace(tags={"user_tag": f"value-{number}", "unicode": "é ✓"})
                with mlflow.start_span(name="retrieve", span_type="RETRIEVER") as child:
                    child.set_inputs(f"query {number}")
                    child.set_attribute("number", number)
                    child.set_attribute("ratio", 0.25 + number)
                    child.set_attribute("flag", number == 0)
                    child.set_attribute("names", ["a", "b"])
                    with mlflow.start_span(name="embed") as grandchild:
                        grandchild.set_attribute("dimensions", 768)
                        grandchild.set_outputs([0.5, -1.25])
                    child.set_outputs({"documents": [{"id": number, "text": "doc é"}]})
                span.set_outputs({"answer": f"a{number}"})
            self.summary["traces"] = self.summary.get("traces", 0) + 1
        # A trace whose span raises: status ERROR, an exception event.
        try:
            with mlflow.start_span(name="ferry-failing") as span:
                span.set_inputs({"question": "fail"})
                raise ValueError("ferry's deliberate failure")
        except ValueError:
            pass
        self.summary["traces"] += 1
        # A trace made inside a run: its metadata names the run.
        run = self.client.create_run(experiment_id, start_time=self.tick(), run_name="traced-run")
        self.summary["runs"] += 1
        with mlflow.start_run(run_id=run.info.run_id):
            with mlflow.start_span(name="ferry-in-run") as span:
                span.set_inputs({"x": 1})
                span.set_outputs({"y": 2})
        self.summary["traces"] += 1
        mlflow.flush_trace_async_logging()

    def make_assessments(self):
        """A feedback and an expectation on the first trace (3.x only)."""
        from mlflow.entities import AssessmentSource

        experiment_id = self.runs[1]["experiment_id"]
        traces = self.client.search_traces(locations=[experiment_id], order_by=["timestamp_ms ASC"])
        trace_id = traces[0].info.trace_id
        mlflow.log_feedback(
            trace_id=trace_id,
            name="relevance",
            value=0.75,
            rationale="cites the right document",
            source=AssessmentSource(source_type="HUMAN", source_id="alice"),
            metadata={"reviewed": "yes"},
        )
        mlflow.log_expectation(
            trace_id=trace_id,
            name="expected_answer",
            value={"answer": "a0", "sources": [1, 2]},
            source=AssessmentSource(source_type="HUMAN", source_id="bob"),
        )
        self.summary["assessments"] = 2

    def text(self, length):
        alphabet = "abcdefghijklmnopqrstuvwxyz0123456789 "
        return "".join(self.rng.choice(alphabet) for _ in range(length))


def _let_mlflow_2_export_traces():
    """MLflow 2.22.5's span processor subclasses OpenTelemetry's
    SimpleSpanProcessor without calling its __init__; with the
    opentelemetry-sdk its environment resolves to (1.45), on_end then fails
    on the missing `_shutdown` and every trace stays IN_PROGRESS with no
    spans (see NOTES.md). Calling the base __init__ first is all it lacks;
    MLflow still makes and exports every trace itself."""
    if not mlflow.__version__.startswith("2."):
        return
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from mlflow.tracing.processor.mlflow import MlflowSpanProcessor

    if getattr(MlflowSpanProcessor, "_ferry_patched", False):
        return
    original = MlflowSpanProcessor.__init__

    def __init__(self, span_exporter, *args, **kwargs):
        SimpleSpanProcessor.__init__(self, span_exporter)
        original(self, span_exporter, *args, **kwargs)

    MlflowSpanProcessor.__init__ = __init__
    MlflowSpanProcessor._ferry_patched = True


if __name__ == "__main__":
    try:
        main()
    except Exception as error:  # one line a test can show, not a traceback
        print(f"make_data.py failed: {type(error).__name__}: {error}", file=sys.stderr)
        raise
