//! A write that reaches the log twice under one write id is applied once, also when
//! the second copy comes after a snapshot and a restart.

use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId};
use serde_json::json;
use tollgate_raft_store::command::{Command, Op, Outcome, WriteId};
use tollgate_raft_store::schema::EntityKind;
use tollgate_raft_store::TypeConfig;

fn entry(index: u64, command: Command) -> Entry<TypeConfig> {
    Entry { log_id: LogId::new(CommittedLeaderId::new(1, 1), index), payload: EntryPayload::Normal(command) }
}

fn create_consumer(write_id: u128, username: &str) -> Command {
    Command {
        now_s: 1_700_000_000,
        write_id: Some(WriteId(write_id)),
        op: Op::Create {
            kind: EntityKind::Consumer,
            id: uuid::Uuid::from_u128(write_id),
            parent: None,
            body: json!({"username": username}).into(),
        },
    }
}

#[tokio::test]
async fn a_write_id_is_applied_once_across_snapshots_and_restarts() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (_, mut state_machine) = tollgate_raft_store::store::open(dir.path()).await.expect("open");
    // The first attempt, then its retry under the same id (the leader changed while
    // the first was in flight, and both reached the log).
    let answers = state_machine
        .apply([entry(1, create_consumer(7, "alice")), entry(2, create_consumer(7, "alice"))])
        .await
        .expect("apply");
    assert!(matches!(answers[0].result, Ok(Outcome::Created(_))), "{:?}", answers[0].result);
    assert_eq!(answers[1].result, answers[0].result, "the retry answers what the first attempt did");
    // A different write with the same body is a different write: refused as a duplicate.
    let other = state_machine.apply([entry(3, create_consumer(8, "alice"))]).await.expect("apply");
    assert!(other[0].result.is_err());

    state_machine.get_snapshot_builder().await.build_snapshot().await.expect("snapshot");
    drop(state_machine);
    let (_, mut restarted) = tollgate_raft_store::store::open(dir.path()).await.expect("reopen");
    let late = restarted.apply([entry(4, create_consumer(7, "alice"))]).await.expect("apply");
    assert_eq!(late[0].result, answers[0].result, "remembered through the snapshot");
    let consumers = restarted.subscribe().borrow().state.table(EntityKind::Consumer).len();
    assert_eq!(consumers, 1);
}
