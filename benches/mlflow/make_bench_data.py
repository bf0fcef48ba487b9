#!/usr/bin/env python3
"""Fills an MLflow tracking server with the bench's data set, seeded.

    MLFLOW_TRACKING_URI=http://127.0.0.1:PORT python make_bench_data.py \
        [--experiments 20] [--runs 50] [--metrics 20] [--steps 100] [--seed 7]

Per experiment (with 2 tags): --runs runs, each with a name, a start and end
time, 10 params, 5 tags and --metrics metric keys of --steps points each,
written with MLflow's own Python client (log_batch, 1,000 entities a call,
as a training loop that batches would), --threads experiments at a time.
Every value comes from the seed and the experiment's number, so the data set
is the same whatever the threads. Prints a JSON summary.
"""

import argparse
import concurrent.futures
import json
import random
import time

from mlflow import MlflowClient
from mlflow.entities import Metric, Param

BASE_TIME_MS = 1_700_000_000_000


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiments", type=int, default=20)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--metrics", type=int, default=20)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--threads", type=int, default=4)
    args = parser.parse_args()
    started = time.monotonic()

    # Experiments are made in number order first (ids follow names), then
    # filled side by side.
    client = MlflowClient()
    experiment_ids = [
        client.create_experiment(
            f"bench-experiment-{e:03d}", tags={"team": f"t{e % 4}", "bench": "mlflow"}
        )
        for e in range(args.experiments)
    ]

    def experiment(e):
        rng = random.Random(args.seed * 1_000_003 + e)
        client = MlflowClient()
        experiment_id = experiment_ids[e]
        for r in range(args.runs):
            start = BASE_TIME_MS + (e * args.runs + r) * 60_000
            run = client.create_run(
                experiment_id,
                run_name=f"run-{e:03d}-{r:03d}",
                start_time=start,
                tags={f"tag{t}": f"value-{rng.randrange(10**6)}" for t in range(5)},
            )
            run_id = run.info.run_id
            params = [Param(f"param{p}", str(rng.random())) for p in range(10)]
            metrics = [
                Metric(f"metric{m:02d}", rng.gauss(0, 1), start + step * 100, step)
                for m in range(args.metrics)
                for step in range(args.steps)
            ]
            client.log_batch(run_id, metrics=metrics[:990], params=params)
            for first in range(990, len(metrics), 1000):
                client.log_batch(run_id, metrics=metrics[first : first + 1000])
            client.set_terminated(run_id, "FINISHED", end_time=start + args.steps * 100 + 1)

    with concurrent.futures.ThreadPoolExecutor(args.threads) as pool:
        list(pool.map(experiment, range(args.experiments)))
    runs = args.experiments * args.runs
    points = runs * args.metrics * args.steps
    print(
        json.dumps(
            {
                "experiments": args.experiments,
                "runs": runs,
                "metric_points": points,
                "seconds": round(time.monotonic() - started, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
