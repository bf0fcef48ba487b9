//! The conformance suite (`ferry_engine::conformance`) on the etcd adapter,
//! against real etcd servers started on 127.0.0.1: every check of the live
//! contract and the batch one passes.

use async_trait::async_trait;
use ferry_engine::adapters::live::Position;
use ferry_engine::conformance::{self, CHECKS, Change, Contents, Plane, Planes, Verdict};
use ferry_proto::etcd::etcdserverpb::request_op::Request as TxnRequestOp;
use ferry_proto::etcd::etcdserverpb::{DeleteRangeRequest, PutRequest, RequestOp, TxnRequest};
use ferry_tests::etcd::EtcdServer;
use ferry_tests::plane::{FerryKeys, dump, kv};

/// A real etcd as a plane; its own clients write with Txns.
struct Etcd(EtcdServer);

#[async_trait]
impl Plane for Etcd {
    fn url(&self) -> String {
        self.0.url()
    }

    async fn write(&self, changes: &[Change]) -> Result<Position, String> {
        let success = changes
            .iter()
            .map(|change| RequestOp {
                request: Some(match change {
                    Change::Put { key, value } => TxnRequestOp::RequestPut(PutRequest {
                        key: key.clone(),
                        value: value.clone(),
                        ..PutRequest::default()
                    }),
                    Change::Delete { key } => {
                        TxnRequestOp::RequestDeleteRange(DeleteRangeRequest {
                            key: key.clone(),
                            ..DeleteRangeRequest::default()
                        })
                    }
                }),
            })
            .collect();
        let answer = kv(&self.0)
            .await
            .txn(TxnRequest {
                success,
                ..TxnRequest::default()
            })
            .await
            .map_err(|status| status.message().to_owned())?
            .into_inner();
        Ok(Position(
            answer.header.map_or(0, |header| header.revision) as u64
        ))
    }

    async fn read_all(&self) -> Contents {
        dump(&self.0, b"", FerryKeys::Excluded)
            .await
            .into_iter()
            .map(|kv| (kv.key, kv.value))
            .collect()
    }
}

struct EtcdServers;

#[async_trait]
impl Planes for EtcdServers {
    async fn start(&self) -> Box<dyn Plane> {
        Box::new(Etcd(EtcdServer::start().expect("etcd starts")))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_passes_the_conformance_suite() {
    let verdicts = conformance::run(&EtcdServers).await;
    let names: Vec<&str> = verdicts.iter().map(|(name, _)| *name).collect();
    assert_eq!(names, CHECKS);
    for (name, verdict) in &verdicts {
        assert_eq!(*verdict, Verdict::Passed, "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_restore_killed_with_sigkill_resumes_to_the_same_data() {
    ferry_tests::conformance::restore_survives_kill_9(
        &EtcdServers,
        6_000,
        &["--max-txn-ops", "16"],
    )
    .await;
}
