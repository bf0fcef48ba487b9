//! `ferry migrate status|resume|abort`: a migration's live state, read from
//! the old plane's fence record (through the source agent) and from every
//! gateway, and the commands that finish or undo an interrupted cutover
//! from that state, from any machine, as often as they are run.
//!
//! - **resume**: a switch the record says was committed is completed on
//!   every gateway that has not made it (held, switched, released). A
//!   cutover in doubt (fenced, not committed) cannot be finished without
//!   its stream, so it is rolled back as `abort` does; run the migration
//!   again afterwards.
//! - **abort**: a cutover in doubt is rolled back: the old plane unfenced
//!   (the same compare-and-swap as the commit, so a late commit and an
//!   abort cannot both win), and every gateway's hold released to it. A
//!   committed switch cannot be aborted.
//!
//! Both release any hold a gateway still keeps for the record's epoch.

use ferry_proto::v1::{FenceStatusRequest, FenceStatusResponse, GatewayStatusResponse};
use serde::Serialize;

use super::error::{MigrateError, call_error};
use super::gateways::Gateways;
use crate::client::{ClientOptions, connect_source};
use crate::remote::status_text;

/// Where to read a migration's state.
#[derive(Debug, Clone)]
pub struct DecideOptions {
    /// The SourceAgent beside the old plane.
    pub source_agent: String,
    /// Every gateway replica's admin address.
    pub gateways: Vec<String>,
    /// Token and TLS for the agents and the gateways.
    pub client: ClientOptions,
}

/// One gateway, as it answered.
#[derive(Debug, Clone, Serialize)]
pub struct GatewayState {
    /// Its admin address.
    pub address: String,
    /// Where it sends clients, when it answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_url: Option<String>,
    /// The highest epoch it has seen.
    pub epoch: u64,
    /// Whether it holds writes.
    pub holding: bool,
    /// Writes waiting in its line.
    pub queued_writes: u64,
    /// Why a lapsed hold is not settled yet, when it is not.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub settling: String,
    /// Why it did not answer, when it did not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unreachable: Option<String>,
}

/// A migration's live state.
#[derive(Debug, Clone, Serialize)]
pub struct LiveStatus {
    /// The old plane's fence record in words.
    pub record: String,
    /// `none`, `unfenced`, `in doubt` or `switched`.
    pub decision: &'static str,
    /// The record's epoch.
    pub epoch: u64,
    /// The plane the record names as the successor.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub successor_url: String,
    /// F, while fenced.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fenced_position: Option<u64>,
    /// The epochs whose write alarm is raised on the old plane.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub write_alarms: Vec<u64>,
    /// Every gateway.
    pub gateways: Vec<GatewayState>,
}

/// What resume or abort did.
#[derive(Debug, Clone, Serialize)]
pub struct Decided {
    /// `switched` or `rolled back` (or `nothing to do` when no migration
    /// was under way).
    pub outcome: &'static str,
    /// The record's epoch.
    pub epoch: u64,
    /// What was done, step by step.
    pub steps: Vec<String>,
    /// The state after.
    pub status: LiveStatus,
}

fn decision(record: &FenceStatusResponse) -> &'static str {
    match record {
        record if !record.recorded => "none",
        record if record.switched => "switched",
        record if record.fenced => "in doubt",
        _ => "unfenced",
    }
}

fn describe(record: &FenceStatusResponse) -> String {
    let alarms = &record.write_alarm_epochs;
    if !record.fenced && !alarms.is_empty() {
        return format!(
            "not fenced (last epoch {}), but the write alarm of epoch {} is raised: its migration died before it fenced; `ferry migrate abort` lowers it",
            record.epoch,
            alarms.iter().max().unwrap_or(&0)
        );
    }
    match decision(record) {
        "none" => "no migration has fenced this plane".to_owned(),
        "switched" => format!(
            "epoch {} switched this plane's clients to {} (fenced at {})",
            record.epoch, record.successor_url, record.fenced_position
        ),
        "in doubt" => format!(
            "epoch {} fenced this plane at {} to switch to {}, and has not committed",
            record.epoch, record.fenced_position, record.successor_url
        ),
        _ => format!("not fenced (last epoch {})", record.epoch),
    }
}

struct Connected {
    source: crate::client::SourceClient,
    gateways: Gateways,
    client: ClientOptions,
}

impl Connected {
    /// A driver of one replica alone (for a hold of its own).
    async fn one(&self, address: &str) -> Result<Gateways, MigrateError> {
        Gateways::connect(&[address.to_owned()], &self.client)
            .await
            .map_err(|(address, source)| MigrateError::Connect {
                role: format!("the gateway at {address}"),
                source,
            })
    }
}

async fn connect(options: &DecideOptions) -> Result<Connected, MigrateError> {
    let source = connect_source(&options.source_agent, &options.client)
        .await
        .map_err(|source| MigrateError::Connect {
            role: format!("the source agent at {}", options.source_agent),
            source,
        })?;
    let gateways = Gateways::connect(&options.gateways, &options.client)
        .await
        .map_err(|(address, source)| MigrateError::Connect {
            role: format!("the gateway at {address}"),
            source,
        })?;
    Ok(Connected {
        source,
        gateways,
        client: options.client.clone(),
    })
}

async fn read(
    connected: &mut Connected,
) -> Result<(FenceStatusResponse, LiveStatus), MigrateError> {
    let record = connected
        .source
        .fence_status(FenceStatusRequest {})
        .await
        .map_err(|status| call_error("the source agent", "read the fence record", status))?
        .into_inner();
    let gateways = connected
        .gateways
        .status()
        .await
        .into_iter()
        .map(|(address, answer)| gateway_state(address, answer))
        .collect();
    let status = LiveStatus {
        record: describe(&record),
        decision: decision(&record),
        epoch: record.epoch,
        successor_url: record.successor_url.clone(),
        fenced_position: record.fenced.then_some(record.fenced_position),
        write_alarms: record.write_alarm_epochs.clone(),
        gateways,
    };
    Ok((record, status))
}

fn gateway_state(address: String, answer: Result<GatewayStatusResponse, String>) -> GatewayState {
    match answer {
        Ok(status) => GatewayState {
            address,
            upstream_url: Some(status.upstream_url),
            epoch: status.epoch,
            holding: status.holding,
            queued_writes: status.queued_writes,
            settling: status.settling,
            unreachable: None,
        },
        Err(reason) => GatewayState {
            address,
            upstream_url: None,
            epoch: 0,
            holding: false,
            queued_writes: 0,
            settling: String::new(),
            unreachable: Some(reason),
        },
    }
}

/// A migration's live state, from the old plane's record and the gateways.
pub async fn live_status(options: &DecideOptions) -> Result<LiveStatus, MigrateError> {
    let mut connected = connect(options).await?;
    Ok(read(&mut connected).await?.1)
}

/// Finishes an interrupted migration from the old plane's record (see the
/// module's documentation).
pub async fn resume(options: &DecideOptions) -> Result<Decided, MigrateError> {
    let mut connected = connect(options).await?;
    let (record, _) = read(&mut connected).await?;
    let orphaned_alarm = !record.fenced && !record.write_alarm_epochs.is_empty();
    if (record.fenced && !record.switched) || orphaned_alarm {
        let mut decided = roll_back(&mut connected, &record).await?;
        decided.steps.insert(
            0,
            "the cutover was not committed, and cannot be finished without its stream: rolled back; run `ferry migrate --live` again".to_owned(),
        );
        return Ok(decided);
    }
    let mut steps = Vec::new();
    if record.switched {
        for (address, status) in connected.gateways.status().await {
            let status = status.map_err(MigrateError::Invalid)?;
            if status.upstream_url == record.successor_url && !status.holding {
                steps.push(format!(
                    "the gateway at {address} serves {} already",
                    record.successor_url
                ));
                continue;
            }
            let mut one = connected.one(&address).await?;
            // A gateway's own epoch may be past the record's (a lapsed
            // hold it took at start); hold with the higher.
            let epoch = record.epoch.max(status.epoch);
            one.hold(epoch, super::gateways::GATEWAY_CALL_TIMEOUT)
                .await
                .map_err(MigrateError::Invalid)?;
            if status.upstream_url != record.successor_url {
                let refused = one.switch(epoch, &record.successor_url).await;
                if let Some(reason) = refused.into_iter().next() {
                    one.release(epoch).await;
                    return Err(MigrateError::Invalid(reason));
                }
            }
            let (released, failures) = one.release(epoch).await;
            if let Some(reason) = failures.into_iter().next() {
                return Err(MigrateError::Invalid(reason));
            }
            steps.push(format!(
                "switched the gateway at {address} to {} ({} held writes released)",
                record.successor_url, released.released_writes
            ));
        }
    } else {
        steps.extend(release_stale_holds(&mut connected, &record).await?);
    }
    let (_, status) = read(&mut connected).await?;
    Ok(Decided {
        outcome: if record.switched {
            "switched"
        } else {
            "nothing to do"
        },
        epoch: record.epoch,
        steps,
        status,
    })
}

/// Rolls back an interrupted migration that has not committed (see the
/// module's documentation).
pub async fn abort(options: &DecideOptions) -> Result<Decided, MigrateError> {
    let mut connected = connect(options).await?;
    let (record, _) = read(&mut connected).await?;
    if record.switched {
        return Err(MigrateError::Invalid(format!(
            "{}: a committed switch cannot be aborted; run `ferry migrate resume` to finish it on every gateway",
            describe(&record)
        )));
    }
    roll_back(&mut connected, &record).await
}

async fn roll_back(
    connected: &mut Connected,
    record: &FenceStatusResponse,
) -> Result<Decided, MigrateError> {
    let mut steps = Vec::new();
    // An alarm raised by an attempt that died before it fenced is lowered
    // the same way (an unfence lowers its epoch's alarms and older ones).
    let orphaned = record.write_alarm_epochs.iter().copied().max().unwrap_or(0);
    let unfencing = record.fenced || orphaned > 0;
    if unfencing {
        connected
            .source
            .unfence(ferry_proto::v1::UnfenceRequest {
                epoch: record.epoch.max(orphaned),
            })
            .await
            .map_err(|status| {
                MigrateError::Invalid(format!(
                    "the source agent could not unfence the old plane: {}",
                    status_text(&status)
                ))
            })?;
        steps.push(format!(
            "unfenced the old plane (epoch {}) and lowered its write alarm",
            record.epoch.max(orphaned)
        ));
    }
    steps.extend(release_stale_holds(connected, record).await?);
    let (_, status) = read(connected).await?;
    Ok(Decided {
        outcome: if unfencing {
            "rolled back"
        } else {
            "nothing to do"
        },
        epoch: record.epoch,
        steps,
        status,
    })
}

/// Releases every gateway that still holds writes (its driver gone, its
/// lapse not settled yet): they go on to the plane it serves.
async fn release_stale_holds(
    connected: &mut Connected,
    record: &FenceStatusResponse,
) -> Result<Vec<String>, MigrateError> {
    let mut steps = Vec::new();
    let statuses = connected.gateways.status().await;
    for (address, status) in statuses {
        let status = status.map_err(MigrateError::Invalid)?;
        if !status.holding {
            continue;
        }
        let released = connected
            .one(&address)
            .await?
            .release(status.epoch.max(record.epoch))
            .await;
        if let Some(reason) = released.1.into_iter().next() {
            return Err(MigrateError::Invalid(reason));
        }
        steps.push(format!(
            "released the writes the gateway at {address} held ({})",
            released.0.released_writes
        ));
    }
    Ok(steps)
}
