//! The conformance suite (`ferry_engine::conformance`) on the mlflow
//! adapter, against real MLflow 3.17.2 servers the test starts on
//! 127.0.0.1, one per plane: the five batch checks pass (the adapter has no
//! live stream, and says so for the other five). And the suite's end-to-end
//! variant: `ferry restore` killed with SIGKILL resumes to the same data.
//!
//! A plane's own clients keep a key/value pair as a run, over MLflow's REST
//! API (not through ferry): a put of a new key creates a run in experiment
//! `conformance` tagged `conformance.key` and `conformance.value`; a put of
//! a key it holds sets the run's `conformance.value` tag with `log-batch`;
//! a delete deletes the run. What a plane holds is its active runs' tag
//! pairs. A restore brings each run back with `runs/create`, then a
//! `log-batch` carrying its tags (the op that puts the key), and deletes a
//! deleted run with `runs/delete` (the op that removes it).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use ferry_engine::Op;
use ferry_engine::adapters::live::Position;
use ferry_engine::conformance::{self, CHECKS, Change, Contents, Plane, Planes, Verdict};
use ferry_tests::mlflow::{MlflowServer, MlflowVersion};
use serde_json::{Value, json};

/// The tag holding a run's key.
const KEY_TAG: &str = "conformance.key";
/// The tag holding a run's value.
const VALUE_TAG: &str = "conformance.value";
/// The experiment a plane's runs are made in.
const EXPERIMENT: &str = "conformance";

/// One MLflow server as a plane, and its client's state: the experiment,
/// and the run of each key it holds.
struct MlflowPlane {
    server: MlflowServer,
    http: reqwest::Client,
    state: tokio::sync::Mutex<ClientState>,
}

#[derive(Default)]
struct ClientState {
    experiment_id: Option<String>,
    runs: HashMap<Vec<u8>, String>,
}

fn text(bytes: &[u8]) -> Result<&str, String> {
    std::str::from_utf8(bytes)
        .map_err(|_| format!("{:?} is not UTF-8", String::from_utf8_lossy(bytes)))
}

fn tag<'a>(holder: &'a Value, key: &str) -> Option<&'a str> {
    holder["tags"]
        .as_array()?
        .iter()
        .find(|tag| tag["key"] == key)?["value"]
        .as_str()
}

impl MlflowPlane {
    /// `POST /api/2.0/mlflow/<request>` with a JSON body; `Err` with the
    /// server's answer when it is not a 200.
    /// `POST request`. A busy server's "QueuePool limit ... timed out"
    /// (MLflow answers its SQLAlchemy pool's timeout with 400) and 503 are
    /// asked again, a few times, as any client of a loaded server must.
    async fn post(&self, request: &str, body: &Value) -> Result<Value, String> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let answer = self
                .http
                .post(format!("{}/api/2.0/mlflow/{request}", self.server.url()))
                .header("Content-Type", "application/json")
                .body(body.to_string())
                .send()
                .await
                .map_err(|error| format!("{request}: {error}"))?;
            let status = answer.status();
            let text = answer
                .text()
                .await
                .map_err(|error| format!("{request}: {error}"))?;
            let busy = status == reqwest::StatusCode::SERVICE_UNAVAILABLE
                || text.contains("QueuePool limit");
            if busy && attempt < 5 {
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                continue;
            }
            if !status.is_success() {
                return Err(format!("{request}: {status}: {text}"));
            }
            return serde_json::from_str(&text)
                .map_err(|error| format!("{request}: {error}: {text}"));
        }
    }

    async fn experiment_id(&self, state: &mut ClientState) -> Result<String, String> {
        if let Some(id) = &state.experiment_id {
            return Ok(id.clone());
        }
        let created = self
            .post("experiments/create", &json!({ "name": EXPERIMENT }))
            .await?;
        let id = created["experiment_id"]
            .as_str()
            .ok_or_else(|| format!("experiments/create answered no id: {created}"))?
            .to_owned();
        state.experiment_id = Some(id.clone());
        Ok(id)
    }

    async fn put(&self, state: &mut ClientState, key: &[u8], value: &[u8]) -> Result<(), String> {
        let (key_text, value) = (text(key)?, text(value)?);
        if let Some(run_id) = state.runs.get(key) {
            self.post(
                "runs/log-batch",
                &json!({ "run_id": run_id, "tags": [{ "key": VALUE_TAG, "value": value }] }),
            )
            .await?;
            return Ok(());
        }
        let experiment_id = self.experiment_id(state).await?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("after 1970")
            .as_millis() as u64;
        let created = self
            .post(
                "runs/create",
                &json!({
                    "experiment_id": experiment_id,
                    "run_name": key_text,
                    "start_time": now,
                    "tags": [
                        { "key": KEY_TAG, "value": key_text },
                        { "key": VALUE_TAG, "value": value },
                    ],
                }),
            )
            .await?;
        let run_id = created["run"]["info"]["run_id"]
            .as_str()
            .ok_or_else(|| format!("runs/create answered no run id: {created}"))?;
        state.runs.insert(key.to_vec(), run_id.to_owned());
        Ok(())
    }
}

#[async_trait]
impl Plane for MlflowPlane {
    fn url(&self) -> String {
        self.server.ferry_url()
    }

    /// The changes one request after the other: MLflow has no
    /// transactions, and a batch source makes none.
    async fn write(&self, changes: &[Change]) -> Result<Position, String> {
        let mut state = self.state.lock().await;
        for change in changes {
            match change {
                Change::Put { key, value } => self.put(&mut state, key, value).await?,
                Change::Delete { key } => {
                    if let Some(run_id) = state.runs.remove(key) {
                        self.post("runs/delete", &json!({ "run_id": run_id }))
                            .await?;
                    }
                }
            }
        }
        Ok(Position(0))
    }

    async fn read_all(&self) -> Contents {
        let experiments = self
            .post(
                "experiments/search",
                &json!({ "max_results": 1000, "view_type": "ALL" }),
            )
            .await
            .expect("experiments/search");
        let ids: Vec<&Value> = experiments["experiments"]
            .as_array()
            .map(|all| {
                all.iter()
                    .map(|experiment| &experiment["experiment_id"])
                    .collect()
            })
            .unwrap_or_default();
        let mut contents = Contents::new();
        let mut page_token: Option<String> = None;
        loop {
            let mut request = json!({
                "experiment_ids": ids,
                "run_view_type": "ACTIVE_ONLY",
                "max_results": 1000,
            });
            if let Some(token) = &page_token {
                request["page_token"] = json!(token);
            }
            let page = self
                .post("runs/search", &request)
                .await
                .expect("runs/search");
            for run in page["runs"].as_array().into_iter().flatten() {
                if let (Some(key), Some(value)) =
                    (tag(&run["data"], KEY_TAG), tag(&run["data"], VALUE_TAG))
                {
                    contents.insert(key.as_bytes().to_vec(), value.as_bytes().to_vec());
                }
            }
            page_token = page["next_page_token"]
                .as_str()
                .filter(|token| !token.is_empty())
                .map(str::to_owned);
            if page_token.is_none() {
                return contents;
            }
        }
    }
}

/// MLflow 3.17.2 servers, and the key of each source run the ops named.
#[derive(Default)]
struct MlflowServers {
    /// Source run id to the key its `log-batch` carried: a `runs/delete`
    /// names only the run.
    keys: Mutex<HashMap<String, Vec<u8>>>,
}

#[async_trait]
impl Planes for MlflowServers {
    async fn start(&self) -> Box<dyn Plane> {
        let server = tokio::task::spawn_blocking(|| MlflowServer::start(MlflowVersion::V3))
            .await
            .expect("the start does not panic")
            .expect("an MLflow 3.17.2 server starts");
        Box::new(MlflowPlane {
            server,
            http: reqwest::Client::new(),
            state: tokio::sync::Mutex::default(),
        })
    }

    /// A run's `log-batch` with the key's tags puts the key; `runs/delete`
    /// removes it; the rest (experiments, `runs/create`, `runs/update`)
    /// shows nothing by itself.
    fn change_made_by(&self, op: &Op) -> Option<Change> {
        let method = String::from_utf8_lossy(&op.method);
        let request = method.rsplit('/').take(2).collect::<Vec<_>>();
        let body: Value = serde_json::from_slice(&op.body).expect("an MLflow op's body is JSON");
        let run_id = body["run_id"].as_str().unwrap_or_default().to_owned();
        let mut keys = self.keys.lock().expect("not poisoned");
        match request.as_slice() {
            ["log-batch", "runs"] => {
                let key = tag(&body, KEY_TAG)?.as_bytes().to_vec();
                let value = tag(&body, VALUE_TAG)
                    .unwrap_or_else(|| panic!("op seq {}: {KEY_TAG} without {VALUE_TAG}", op.seq));
                keys.insert(run_id, key.clone());
                Some(Change::Put {
                    key,
                    value: value.as_bytes().to_vec(),
                })
            }
            ["delete", "runs"] => {
                let key = keys.get(&run_id).unwrap_or_else(|| {
                    panic!(
                        "op seq {}: runs/delete of run {run_id}, whose log-batch came before no delete",
                        op.seq
                    )
                });
                Some(Change::Delete { key: key.clone() })
            }
            _ => None,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mlflow_passes_the_batch_conformance_suite() {
    let verdicts = conformance::run(&MlflowServers::default()).await;
    let names: Vec<&str> = verdicts.iter().map(|(name, _)| *name).collect();
    assert_eq!(names, CHECKS);
    for (name, verdict) in &verdicts {
        let batch =
            !name.starts_with("live_") && !["fence_then_position", "digests_agree"].contains(name);
        if batch {
            assert_eq!(*verdict, Verdict::Passed, "{name}");
        } else {
            assert!(
                matches!(verdict, Verdict::NotSupported(why) if why.contains("no live adapter")),
                "{name}: {verdict:?}: the mlflow adapter has no live stream yet"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mlflow_restore_killed_with_sigkill_resumes_to_the_same_data() {
    ferry_tests::conformance::restore_survives_kill_9(
        &MlflowServers::default(),
        400,
        &["--mlflow-ops-per-checkpoint", "16"],
    )
    .await;
}
