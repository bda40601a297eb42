//! openraft's storage conformance suite, run against the redb storage.

use openraft::testing::{StoreBuilder, Suite};
use openraft::StorageError;
use tollgate_raft_store::store::{LogStore, StateMachineStore};
use tollgate_raft_store::{NodeId, TypeConfig};

struct RedbBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for RedbBuilder {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), StorageError<NodeId>> {
        let dir = tempfile::tempdir().expect("temp dir");
        let (log, state_machine) = tollgate_raft_store::store::open(dir.path()).await?;
        Ok((dir, log, state_machine))
    }
}

#[test]
fn redb_storage_passes_openraft_suite() {
    if let Err(error) = Suite::test_all(RedbBuilder) {
        panic!("openraft storage suite failed: {error}");
    }
}
