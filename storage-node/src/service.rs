//! The `bulwark.v1.Node` gRPC service: adapters between the wire and the node.
//!
//! Each handler states the roles that may call it, parses the request into domain
//! types once ([`crate::wire`]), calls one operation of [`NodeService`] and maps its
//! error to a status ([`crate::error`]). Turns and idle timeouts are
//! [`crate::node::admission`]'s.

use std::sync::Arc;

use bulwark_common::tls::{Role, require};
use bulwark_proto as pb;
use tonic::{Request, Response, Status, Streaming};

use crate::node::{BoxStream, NodeService};
use crate::wire::{self, GrantChange, ImportFrom, LockChange, PointRef, ShipStart, SyncStart};

use crate::node::admission::next_within;

/// The service handle tonic serves (the state is shared with the heartbeat loop).
#[derive(Clone)]
pub struct NodeApi(pub Arc<NodeService>);

#[tonic::async_trait]
impl pb::node_server::Node for NodeApi {
    type SyncStream = BoxStream<pb::SyncReply>;
    type RestoreStream = BoxStream<pb::RestoreChunk>;
    type ExportStream = BoxStream<pb::ExportChunk>;
    type ShipLogStream = BoxStream<pb::LogReply>;
    type RestoreLogStream = BoxStream<pb::LogChunk>;

    async fn ship_log(
        &self,
        req: Request<Streaming<pb::LogMessage>>,
    ) -> Result<Response<Self::ShipLogStream>, Status> {
        let caller = require(&req, "ShipLog", &[Role::Agent])?;
        let mut inbound = req.into_inner();
        // Nothing is held for a caller that is still unknown: first its Begin,
        // within the idle timeout (see admission).
        let first = next_within(&mut inbound, self.0.idle(), "log ship").await?;
        let start = ShipStart::try_from(first)?;
        let replies = self.0.clone().ship_log(caller, start, inbound).await?;
        Ok(Response::new(replies))
    }

    async fn restore_log(
        &self,
        req: Request<pb::NodeRestoreRequest>,
    ) -> Result<Response<Self::RestoreLogStream>, Status> {
        let caller = require(&req, "RestoreLog", &[Role::Agent, Role::Admin])?;
        let at = PointRef::try_from(req.into_inner())?;
        Ok(Response::new(self.0.clone().restore_log(caller, at).await?))
    }

    async fn sync(
        &self,
        req: Request<Streaming<pb::SyncMessage>>,
    ) -> Result<Response<Self::SyncStream>, Status> {
        let caller = require(&req, "Sync", &[Role::Agent])?;
        let mut inbound = req.into_inner();
        // Nothing is held for a caller that is still unknown: first its Begin,
        // within the idle timeout, then its authority, then turns (see admission).
        let first = next_within(&mut inbound, self.0.idle(), "sync").await?;
        let start = SyncStart::try_from(first)?;
        let replies = self.0.clone().sync(caller, start, inbound).await?;
        Ok(Response::new(replies))
    }

    async fn restore(
        &self,
        req: Request<pb::NodeRestoreRequest>,
    ) -> Result<Response<Self::RestoreStream>, Status> {
        let caller = require(&req, "Restore", &[Role::Agent, Role::Admin])?;
        let at = PointRef::try_from(req.into_inner())?;
        Ok(Response::new(self.0.clone().restore(caller, at).await?))
    }

    async fn list_points(
        &self,
        req: Request<pb::ListPointsRequest>,
    ) -> Result<Response<pb::ListPointsResponse>, Status> {
        require(&req, "ListPoints", &[Role::Coordinator])?;
        let source = wire::source(&req.into_inner().source)?;
        Ok(Response::new(self.0.list_points(source).await?))
    }

    async fn verify(
        &self,
        req: Request<pb::NodeVerifyRequest>,
    ) -> Result<Response<pb::VerifyReport>, Status> {
        require(&req, "Verify", &[Role::Coordinator])?;
        let at = PointRef::try_from(req.into_inner())?;
        Ok(Response::new(self.0.verify(at).await?))
    }

    async fn export(
        &self,
        req: Request<pb::ExportRequest>,
    ) -> Result<Response<Self::ExportStream>, Status> {
        let caller = require(&req, "Export", &[Role::Node])?;
        let source = wire::source(&req.into_inner().source)?;
        Ok(Response::new(self.0.clone().export(caller, source).await?))
    }

    async fn import(
        &self,
        req: Request<pb::ImportRequest>,
    ) -> Result<Response<pb::ImportResponse>, Status> {
        require(&req, "Import", &[Role::Coordinator])?;
        let from = ImportFrom::try_from(req.into_inner())?;
        Ok(Response::new(self.0.import(from).await?))
    }

    async fn drop_source(
        &self,
        req: Request<pb::DropSourceRequest>,
    ) -> Result<Response<pb::DropSourceResponse>, Status> {
        require(&req, "DropSource", &[Role::Coordinator])?;
        let source = wire::source(&req.into_inner().source)?;
        let dropped = self.0.drop_copy(source).await?;
        Ok(Response::new(pb::DropSourceResponse { dropped }))
    }

    async fn set_lock(
        &self,
        req: Request<pb::SetLockRequest>,
    ) -> Result<Response<pb::SetLockResponse>, Status> {
        let roles = [Role::Coordinator, Role::Admin, Role::Officer];
        let caller = require(&req, "SetLock", &roles)?;
        let change = LockChange::try_from(req.into_inner())?;
        Ok(Response::new(self.0.set_lock(&caller, change).await?))
    }

    async fn list_workers(
        &self,
        req: Request<pb::ListWorkersRequest>,
    ) -> Result<Response<pb::ListWorkersResponse>, Status> {
        require(&req, "ListWorkers", &[Role::Admin])?;
        Ok(Response::new(self.0.workers()))
    }

    async fn grant_restore(
        &self,
        req: Request<pb::GrantRestoreRequest>,
    ) -> Result<Response<pb::GrantRestoreResponse>, Status> {
        require(&req, "GrantRestore", &[Role::Coordinator])?;
        self.0.grant(GrantChange::try_from(req.into_inner())?);
        Ok(Response::new(pb::GrantRestoreResponse {}))
    }
}
