//! Fencing through the daemon on the simulators: the fencing thread as
//! volumed runs it, the reconcile loop, the KV server in process, and what
//! an operator sees through volctl (in process).

use consul_kv::{ClientConfig, ConsulKv};
use consul_kv_server::{Server, ServerConfig};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use volume_control::layout::{Layout, VolumeSpec, VolumeState};
use volume_core::backend::sim::SimBackend;
use volume_core::backend::{ThinBackend, ThinPoolSpec};
use volume_core::fence::sim::SimFenceDevices;
use volume_core::fence::{Fencer, Fences, PoolRoom};
use volume_core::fence_model::{FencePolicy, FenceReason};
use volume_core::health::PoolHealth;
use volume_core::host::sim::SimDevices;
use volume_core::host::VolumeHost;
use volume_core::keys::LocalKeyDir;
use volume_core::names::{LvName, VgName, VolumeId};
use volume_core::pool_growth::PoolPart;
use volume_core::units::{Bytes, Percent, GIB};
use volumed::config::Config;
use volumed::daemon::{Running, Setup};
use volumed::metrics::Metrics;

mod common;
use common::{host_id, host_record, status, volctl, wait_for, HOST};

fn config() -> Config {
    common::config(&["--pool-refresh-interval", "1s"])
}

fn spec(size: Bytes) -> VolumeSpec {
    serde_json::from_value(serde_json::json!({
        "id": VolumeId::generate(),
        "name": "data",
        "host": HOST,
        "region": "ewr",
        "zone": "ewr-a",
        "size": size,
        "encrypted": false,
        "created_ms": 1,
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_pool_fences_only_its_filler_and_volctl_unfences_it() {
    let server = Server::start(ServerConfig::new(SocketAddr::from(([127, 0, 0, 1], 0))))
        .await
        .unwrap();
    let kv = ConsulKv::new(ClientConfig::new(&server.local_addr().to_string()).unwrap()).unwrap();
    let mut pool = ThinPoolSpec::new(
        VgName::new("vmvg-sim").unwrap(),
        LvName::new("pool").unwrap(),
        vec![PathBuf::from("/dev/sim0")],
    )
    .unwrap();
    pool.data_size = Some(Bytes(10 * GIB));
    let sim = Arc::new(SimBackend::new(pool));
    let _ = sim.ensure_pool().unwrap();
    let key_dir = tempfile::tempdir().unwrap();
    let fences = Arc::new(Fences::default());
    let host = Arc::new(
        VolumeHost::new(
            sim.clone(),
            Arc::new(SimDevices::new(sim.clone())),
            Arc::new(LocalKeyDir::open(key_dir.path().join("keys")).unwrap()),
            Default::default(),
        )
        .with_fences(fences.clone()),
    );
    // The VG is full (the simulated VG has no free space).
    let room = Arc::new(PoolRoom::default());
    room.set(false);
    let devices = Arc::new(SimFenceDevices::new(sim.clone()));
    let metrics = Arc::new(Metrics::default());
    let mut fencer = Fencer::new(
        devices.clone(),
        FencePolicy::new(Percent::from_whole(10)).unwrap(),
        room,
        fences,
    );
    volumed::fence::recover(&mut fencer, &metrics);
    let (changed, changes) = tokio::sync::mpsc::unbounded_channel();
    let fencing = volumed::fence::spawn(
        fencer,
        Duration::from_millis(20),
        true,
        metrics.clone(),
        changed,
    )
    .unwrap();
    let daemon = Running::spawn_with_fence_changes(
        Setup {
            config: config(),
            pool: host.pool_status().unwrap(),
            migration: None,
            host,
            kv: kv.clone(),
            metrics: metrics.clone(),
        },
        Some(changes),
    );

    let filler = spec(Bytes(12 * GIB));
    let other = spec(Bytes(4 * GIB));
    for spec in [&filler, &other] {
        let key = Layout::default().desired(&host_id(), &spec.id);
        assert!(kv
            .put(&key, &serde_json::to_vec(spec).unwrap())
            .await
            .unwrap());
    }
    for spec in [&filler, &other] {
        wait_for("ready", || async {
            status(&kv, &spec.id)
                .await
                .filter(|s| s.state == VolumeState::Ready)
        })
        .await;
    }
    let write = |id: &VolumeId, hundredths: u32| {
        sim.simulate_write(&id.lv_name(), Percent::from_hundredths(hundredths))
            .unwrap()
    };
    write(&filler.id, 5000);
    write(&other.id, 1000);
    tokio::time::sleep(Duration::from_millis(100)).await;
    // 9.4 of 10 GiB: the filler took the pool into its reserve.
    write(&filler.id, 7500);
    let reason = wait_for("the filler fenced in its status", || async {
        status(&kv, &filler.id).await?.fenced
    })
    .await;
    assert!(
        matches!(reason, FenceReason::PoolReserve { reserve, .. } if reserve == Percent::from_whole(10)),
        "{reason:?}"
    );
    assert!(devices.is_suspended(&filler.id));
    assert!(!devices.is_suspended(&other.id));
    let record = wait_for("in_reserve in the host record", || async {
        host_record(&kv)
            .await
            .filter(|r| r.pool.health == PoolHealth::InReserve)
    })
    .await;
    assert_eq!(record.pool.headroom(&record.policy), Bytes::ZERO);
    assert_eq!(metrics.fenced_volumes(), 1);

    // What an operator sees.
    let (result, out) = volctl(&kv, &["list"]).await;
    result.unwrap();
    let filler_row = out
        .lines()
        .find(|line| line.contains(filler.id.as_str()))
        .unwrap();
    let other_row = out
        .lines()
        .find(|line| line.contains(other.id.as_str()))
        .unwrap();
    assert!(filler_row.contains("fenced (pool_reserve)"), "{out}");
    assert!(!other_row.contains("fenced"), "{out}");
    let (result, out) = volctl(&kv, &["show", filler.id.as_str()]).await;
    result.unwrap();
    assert!(
        out.lines()
            .any(|line| line.starts_with("fenced ") && line.ends_with(&reason.to_string())),
        "{out}"
    );
    let (result, out) = volctl(&kv, &["show", filler.id.as_str(), "--json"]).await;
    result.unwrap();
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["fenced"]["kind"], "pool_reserve", "{out}");
    assert_eq!(json["status"]["fenced"]["kind"], "pool_reserve", "{out}");

    // The other volume writes on inside the reserve, unfenced.
    write(&other.id, 1200);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(status(&kv, &other.id).await.unwrap().fenced, None);
    assert!(!devices.is_suspended(&other.id));

    // An explicit unfence; a second one is a no-op with the same answer.
    let unfence = ["unfence", filler.id.as_str(), "--timeout", "20"];
    let (result, out) = volctl(&kv, &unfence).await;
    result.unwrap();
    assert_eq!(out, format!("unfenced {}\n", filler.id));
    let (result, out) = volctl(&kv, &unfence).await;
    result.unwrap();
    assert_eq!(out, format!("{} is not fenced\n", filler.id));
    assert!(!devices.is_suspended(&filler.id));
    let (result, _) = volctl(&kv, &["unfence", "vol_ffffffffffffffff", "--timeout", "1"]).await;
    assert_eq!(result.unwrap_err().exit_code(), volctl::exit::NOT_FOUND);

    // Unfenced, the filler writes on; at the floor it is fenced again.
    write(&filler.id, 7800);
    wait_for("the filler fenced again at the floor", || async {
        status(&kv, &filler.id).await?.fenced
    })
    .await;
    // Space returns (a PV added, the pool grown): the fence goes by itself.
    sim.set_vg_free(Bytes(10 * GIB));
    let _ = sim.grow_pool(PoolPart::Data, Bytes(5 * GIB)).unwrap();
    wait_for("the fence to go", || async {
        status(&kv, &filler.id).await.filter(|s| s.fenced.is_none())
    })
    .await;
    assert!(!devices.is_suspended(&filler.id));
    wait_for("healthy again in the host record", || async {
        host_record(&kv)
            .await
            .filter(|r| r.pool.health == PoolHealth::Healthy)
    })
    .await;
    assert_eq!(metrics.fenced_volumes(), 0);
    let text = metrics.render();
    assert!(
        text.contains("volumed_fences_total{reason=\"pool_reserve\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("volumed_unfences_total{cause=\"requested\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("volumed_unfences_total{cause=\"space_returned\"} 1"),
        "{text}"
    );

    daemon.stop().await.unwrap();
    fencing.stop();
    let _ = server.shutdown().await;
}
