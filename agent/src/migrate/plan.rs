//! Planning a live migration (`ferry migrate --live`), before anything
//! changes: connecting to both agents and every gateway, refusing what
//! their adapters cannot carry out, taking the epoch, planning the version
//! migration chain (and reading the snapshot through it first), and the
//! plan `--dry-run` prints.

use std::time::Instant;

use ferry_engine::Op;
use ferry_engine::adapters::live::DigestEntry;
use ferry_engine::adapters::registry::adapter_named;
use ferry_engine::migrations::chain::Chain;
use ferry_proto::v1::{CheckpointRequest, DescribeRequest, DescribeResponse, FenceStatusRequest};
use serde::Serialize;
use tracing::info;

use super::error::{MigrateError, call_error};
use super::gateways::Gateways;
use super::options::MigrateOptions;
use super::report::ms;
use super::versions;
use crate::client::{SourceClient, TargetClient, connect_source, connect_target};

/// One line per step of a planned chain, for the dry run (`plan`).
fn describe_chain(chain: &Chain) -> Vec<String> {
    let plan = chain.plan();
    let mut lines = vec![format!(
        "take every op through profile {}'s chain from version {} to {} ({} steps), before the target sees it",
        plan.platform,
        plan.from,
        plan.to,
        plan.steps.len()
    )];
    lines.extend(plan.steps.iter().map(|step| {
        format!(
            "   {} {} ({} -> {})",
            step.migration.id(),
            step.direction,
            step.from,
            step.to
        )
    }));
    lines
}

/// The plan `--dry-run` prints, and the facts it rests on.
#[derive(Debug, Clone, Serialize)]
pub struct MigrationPlan {
    /// The epoch the migration would use.
    pub epoch: u64,
    /// The old plane, as its agent describes it.
    pub source: String,
    /// The new plane, as its agent describes it.
    pub target: String,
    /// Where the gateway sends clients now.
    pub gateway_upstream: String,
    /// The steps, in order.
    pub steps: Vec<String>,
    /// The version migration chain, one line per step, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version_chain: Option<Vec<String>>,
}

/// What a position of the plane counts ("position" when its agent does
/// not say).
pub(super) fn position_unit(description: &DescribeResponse) -> &str {
    description
        .capabilities
        .as_ref()
        .map(|capabilities| capabilities.position_unit.as_str())
        .filter(|unit| !unit.is_empty())
        .unwrap_or("position")
}

/// Refuses a migration the adapters cannot carry out, before anything
/// changes: the caller's side of the capabilities the agents declare.
fn check_capabilities(
    options: &MigrateOptions,
    source: &DescribeResponse,
    target: &DescribeResponse,
) -> Result<(), MigrateError> {
    let source_can = source.capabilities.clone().unwrap_or_default();
    let target_can = target.capabilities.clone().unwrap_or_default();
    if !source_can.store_fence && options.gateways.is_empty() {
        return Err(MigrateError::Invalid(format!(
            "{} cannot refuse writes by itself (its adapter has no store-level fence): only gateways hold writes back at the cutover. Put clients behind `ferry gateway` and name every replica with --gateway",
            source.control_plane_url
        )));
    }
    if target_can.server_assigned_ids && options.verify {
        return Err(MigrateError::Invalid(format!(
            "--verify compares the two planes key by key, but {} assigns ids of its own (its keys differ from the old plane's by design); migrate without --verify",
            target.control_plane_url
        )));
    }
    Ok(())
}

/// What an op counts as in the digest of the target's plane, from its
/// adapter: `--verify` through a version chain sums the chain's image with
/// it.
pub(super) fn digest_entry_of(
    target: &DescribeResponse,
) -> Result<fn(&Op) -> DigestEntry<'_>, MigrateError> {
    adapter_named(&target.platform)
        .and_then(|adapter| adapter.digest_entry)
        .ok_or_else(|| {
            MigrateError::Invalid(format!(
                "--verify through --migrations compares the new plane's digest with the chain's image of the old plane, and this ferry has no {:?} live sink to say what that digest counts: migrate without --verify, or upgrade ferry",
                target.platform
            ))
        })
}

pub(super) fn describe_plane(description: &DescribeResponse) -> String {
    format!(
        "{} {} (identity {}) at {}",
        description.platform,
        description.platform_version,
        description.identity,
        description.control_plane_url
    )
}

pub(super) struct Connected {
    pub(super) source: SourceClient,
    pub(super) target: TargetClient,
    pub(super) gateways: Gateways,
    pub(super) source_description: DescribeResponse,
    pub(super) target_description: DescribeResponse,
    gateway_upstream: String,
    /// What the gateways add to the old plane's revisions (after earlier
    /// migrations): the new plane's offset builds on it.
    pub(super) revision_offset: i64,
    pub(super) epoch: u64,
}

pub(super) async fn connect_all(options: &MigrateOptions) -> Result<Connected, MigrateError> {
    let role = |what: &str, address: &str| format!("the {what} at {address}");
    let mut source = connect_source(&options.source_agent, &options.client)
        .await
        .map_err(|source| MigrateError::Connect {
            role: role("source agent", &options.source_agent),
            source,
        })?;
    let mut target = connect_target(&options.target_agent, &options.client)
        .await
        .map_err(|source| MigrateError::Connect {
            role: role("target agent", &options.target_agent),
            source,
        })?;
    let gateways = Gateways::connect(&options.gateways, &options.client)
        .await
        .map_err(|(address, source)| MigrateError::Connect {
            role: role("gateway", &address),
            source,
        })?;
    let source_description = source
        .describe(DescribeRequest {})
        .await
        .map_err(|status| call_error("the source agent", "describe its plane", status))?
        .into_inner();
    let target_description = target
        .describe(DescribeRequest {})
        .await
        .map_err(|status| call_error("the target agent", "describe its plane", status))?
        .into_inner();
    check_capabilities(options, &source_description, &target_description)?;
    if !source_description.identity.is_empty()
        && source_description.identity == target_description.identity
    {
        return Err(MigrateError::Invalid(format!(
            "the source and the target agent stand beside the same control plane (identity {}): a plane cannot be migrated onto itself",
            source_description.identity
        )));
    }
    let target_epoch = target
        .checkpoint(CheckpointRequest {
            stream_id: String::new(),
        })
        .await
        .map_err(|status| call_error("the target agent", "tell its epoch", status))?
        .into_inner()
        .epoch;
    let record = source
        .fence_status(FenceStatusRequest {})
        .await
        .map_err(|status| {
            call_error(
                "the source agent",
                "read the old plane's fence record",
                status,
            )
        })?
        .into_inner();
    if record.switched {
        return Err(MigrateError::Invalid(format!(
            "migration epoch {} already switched the old plane's clients to {}: the old plane is fenced for good; migrate from the plane that serves",
            record.epoch, record.successor_url
        )));
    }
    if record.fenced {
        return Err(MigrateError::Invalid(format!(
            "migration epoch {} fenced the old plane and has not decided (switching to {}): run `ferry migrate resume` or `ferry migrate abort` first",
            record.epoch, record.successor_url
        )));
    }
    let mut epoch = target_epoch.max(record.epoch);
    let mut upstreams = Vec::new();
    let mut offsets = Vec::new();
    for (address, status) in gateways.status().await {
        let status = status.map_err(MigrateError::Invalid)?;
        if status.holding {
            return Err(MigrateError::Invalid(format!(
                "the gateway at {address} is holding writes for epoch {} already: another migration is cutting over",
                status.epoch
            )));
        }
        epoch = epoch.max(status.epoch);
        if !offsets.contains(&status.revision_offset) {
            offsets.push(status.revision_offset);
        }
        if !upstreams.contains(&status.upstream_url) {
            upstreams.push(status.upstream_url);
        }
    }
    if offsets.len() > 1 {
        return Err(MigrateError::Invalid(format!(
            "the gateways translate revisions differently (offsets {offsets:?}): they do not stand in front of the same plane"
        )));
    }
    if upstreams.len() > 1 {
        return Err(MigrateError::Invalid(format!(
            "the gateways forward to different planes ({}): every replica must stand in front of the old plane",
            upstreams.join(", ")
        )));
    }
    Ok(Connected {
        source,
        target,
        gateways,
        source_description,
        target_description,
        gateway_upstream: upstreams.pop().unwrap_or_default(),
        revision_offset: offsets.pop().unwrap_or_default(),
        epoch: epoch + 1,
    })
}

/// What a migration would do, from the agents' and the gateway's answers;
/// changes nothing.
pub async fn plan(options: &MigrateOptions) -> Result<MigrationPlan, MigrateError> {
    let connected = connect_all(options).await?;
    let mut chain = plan_chain(options, &connected.source_description)?;
    let source = describe_plane(&connected.source_description);
    let target = describe_plane(&connected.target_description);
    let epoch = connected.epoch;
    let through_chain = chain.as_ref().map_or(String::new(), |chain| {
        format!(
            ", through the version chain {} -> {}",
            chain.plan().from,
            chain.plan().to
        )
    });
    let mut steps = vec![format!(
        "take epoch {epoch} (the highest the target, the old plane's fence record or a gateway has seen, plus one)"
    )];
    if let Some(ops) = precheck_chain(options, &connected, &mut chain).await? {
        steps.push(format!(
            "read a snapshot of {source} through the version chain and write nothing: a filter error or two keys landing on one stops here (done now: {ops} ops, no error)"
        ));
    }
    steps.extend([
        format!(
            "snapshot {source} at its current position R and apply it to {target}{through_chain}, exactly once"
        ),
        format!(
            "follow the source's changes from R+1 until the target is at most {} positions ({}s) behind (at most {:?})",
            options.max_lag,
            position_unit(&connected.source_description),
            options.catch_up_timeout
        ),
        format!(
            "hold writes at every gateway ({}; at most {:?}) and wait for the writes in flight",
            connected.gateways.addresses(),
            options.max_pause
        ),
        format!(
            "fence the old plane (it refuses every gateway's writes from then on), naming {} as its successor, and read its position F",
            connected.target_description.control_plane_url
        ),
        "wait until the target has applied every change through F".to_owned(),
    ]);
    if options.verify {
        steps.push(if chain.is_some() {
            "read the old plane at F through the version chain again and compare a digest of every key and value it makes with the new plane's".to_owned()
        } else {
            "compare a digest of every key and value of the old plane at F with the new plane's"
                .to_owned()
        });
    }
    steps.extend([
        format!(
            "commit the switch in the old plane's fence record, then switch every gateway from {} to {} and release the held writes",
            connected.gateway_upstream, connected.target_description.control_plane_url
        ),
        "on any failure before the commit: unfence the old plane and release the held writes to it; if this process dies, the gateways settle by themselves within --max-pause"
            .to_owned(),
    ]);
    Ok(MigrationPlan {
        epoch,
        source,
        target,
        gateway_upstream: connected.gateway_upstream,
        steps,
        version_chain: chain.as_ref().map(describe_chain),
    })
}

/// Reads a snapshot of the source through `chain`, when there is one, and
/// writes nothing (see [`versions::precheck`]); returns the source ops read.
/// The chain numbers from 1 again afterwards, ready for the stream.
pub(super) async fn precheck_chain(
    options: &MigrateOptions,
    connected: &Connected,
    chain: &mut Option<Chain>,
) -> Result<Option<u64>, MigrateError> {
    let Some(planned) = chain.take() else {
        return Ok(None);
    };
    let started = Instant::now();
    info!("reading the source's snapshot through the version chain first, writing nothing");
    let verify = match options.verify {
        true => Some(digest_entry_of(&connected.target_description)?),
        false => None,
    };
    let (planned, read) = versions::precheck(
        &mut connected.source.clone(),
        planned,
        &options.key_prefix,
        verify,
        connected.epoch,
    )
    .await?;
    *chain = Some(planned);
    info!(
        position = read.position,
        source_ops = read.source_ops,
        outputs = read.outputs,
        ms = ms(started.elapsed()),
        "every op of the snapshot goes through the chain, and no two keys land on one"
    );
    Ok(Some(read.source_ops))
}

/// The version migration chain of `options`, planned against what the
/// source agent describes; an error here comes before anything changes.
pub(super) fn plan_chain(
    options: &MigrateOptions,
    source: &DescribeResponse,
) -> Result<Option<Chain>, MigrateError> {
    options
        .migrations
        .as_ref()
        .map(|migrations| migrations.plan(source))
        .transpose()
        .map_err(MigrateError::Chain)
}
