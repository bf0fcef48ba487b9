#!/usr/bin/env python3
"""Fills an MLflow tracking server with the bench's data set, seeded.

    MLFLOW_TRACKING_URI=http://127.0.0.1:PORT python make_bench_data.py \
        [--experiments 20] [--runs 50] [--metrics 20] [--steps 100] [--seed 7]

Per experiment (with 2 tags): --runs runs, each with a name, a start and end
time, 10 params, 5 tags and --metrics metric keys of --steps points each,
written with MLflow's own Python client (log_batch, 1,000 entities a call,
as a training loop that batches would). Prints a JSON summary.
"""

import argparse
import json
import random
import time

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

BASE_TIME_MS = 1_700_000_000_000


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiments", type=int, default=20)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--metrics", type=int, default=20)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    client = MlflowClient()
    started = time.monotonic()
    points = 0
    runs = 0
    for e in range(args.experiments):
        experiment_id = client.create_experiment(
            f"bench-experiment-{e:03d}", tags={"team": f"t{e % 4}", "bench": "mlflow"}
        )
        for r in range(args.runs):
            start = BASE_TIME_MS + (e * args.runs + r) * 60_000
            run = client.create_run(
                experiment_id,
                run_name=f"run-{e:03d}-{r:03d}",
                start_time=start,
                tags={f"tag{t}": f"value-{rng.randrange(10**6)}" for t in range(5)},
            )
            run_id = run.info.run_id
            entities = [Param(f"param{p}", str(rng.random())) for p in range(10)]
            for m in range(args.metrics):
                for step in range(args.steps):
                    entities.append(
                        Metric(f"metric{m:02d}", rng.gauss(0, 1), start + step * 100, step)
                    )
            for first in range(0, len(entities), 1000):
                chunk = entities[first : first + 1000]
                client.log_batch(
                    run_id,
                    metrics=[x for x in chunk if isinstance(x, Metric)],
                    params=[x for x in chunk if isinstance(x, Param)],
                    tags=[x for x in chunk if isinstance(x, RunTag)],
                )
            client.set_terminated(run_id, "FINISHED", end_time=start + args.steps * 100 + 1)
            points += args.metrics * args.steps
            runs += 1
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
