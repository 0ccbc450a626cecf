//! The `bulwark.v1.Coordinator` gRPC service: adapters only. Each handler checks
//! the caller's role, parses the request with [`crate::wire`], calls one domain
//! operation of [`CoordinatorService`], and maps its error to a `Status` (see
//! [`crate::error`]).

use std::pin::Pin;
use std::sync::Arc;

use bulwark_common::tls::{self, Role, require};
use bulwark_proto as pb;
use futures::{Stream, StreamExt};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::service::CoordinatorService;
use crate::wire;

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The handle tonic serves.
#[derive(Clone)]
pub struct CoordinatorApi(pub Arc<CoordinatorService>);

#[tonic::async_trait]
impl pb::coordinator_server::Coordinator for CoordinatorApi {
    type ControlStream = BoxStream<pb::CoordinatorCommand>;

    async fn register_node(
        &self,
        req: Request<pb::RegisterNodeRequest>,
    ) -> Result<Response<pb::RegisterNodeResponse>, Status> {
        let node = require(&req, "RegisterNode", &[Role::Node])?;
        let r = req.into_inner().try_into()?;
        let assignments = self.0.register_node(&node, &r)?;
        Ok(Response::new(pb::RegisterNodeResponse {
            assignments: wire::assignments(assignments),
        }))
    }

    async fn node_heartbeat(
        &self,
        req: Request<pb::NodeHeartbeatRequest>,
    ) -> Result<Response<pb::NodeHeartbeatResponse>, Status> {
        let node = require(&req, "NodeHeartbeat", &[Role::Node])?;
        let expiry = tls::cert_expiry(&req);
        let hb = req.into_inner();
        let held = hb.revocations_version;
        let (assignments, revocations) = self.0.heartbeat(&node, expiry, &hb.into(), held)?;
        Ok(Response::new(pb::NodeHeartbeatResponse {
            assignments: wire::assignments(assignments),
            revocations,
        }))
    }

    async fn get_assignment(
        &self,
        req: Request<pb::GetAssignmentRequest>,
    ) -> Result<Response<pb::Assignment>, Status> {
        let caller = require(&req, "GetAssignment", &[Role::Node, Role::Agent])?;
        let source = req.into_inner().source;
        Ok(Response::new(
            self.0.get_assignment(&caller, &source)?.into(),
        ))
    }

    async fn control(
        &self,
        req: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::ControlStream>, Status> {
        let agent = require(&req, "Control", &[Role::Agent])?;
        let expiry = tls::cert_expiry(&req);
        let mut inbound = req.into_inner();
        let idle = self.0.stream_idle_timeout();
        let first = tokio::time::timeout(idle, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no Hello within the idle timeout"))?;
        let hello = wire::hello(first?)?;
        let (conn, rx) = self.0.open_session(&agent, expiry, &hello).await?;
        let registry = self.0.registry();
        tokio::spawn(crate::service::control::control_loop(
            registry, agent, conn, inbound, idle,
        ));
        let commands = ReceiverStream::new(rx)
            .take_until(self.0.shutdown_token().cancelled_owned())
            .map(|c| Ok(pb::CoordinatorCommand::from(c)));
        Ok(Response::new(Box::pin(commands)))
    }

    async fn list_nodes(
        &self,
        req: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        require(&req, "ListNodes", &[Role::Admin])?;
        let nodes = self.0.list_nodes()?;
        Ok(Response::new(pb::ListNodesResponse {
            nodes: nodes.into_iter().map(wire::node_info).collect(),
        }))
    }

    async fn list_agents(
        &self,
        req: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        require(&req, "ListAgents", &[Role::Admin])?;
        let agents = self.0.list_agents()?;
        Ok(Response::new(pb::ListAgentsResponse {
            agents: agents
                .into_iter()
                .map(|(a, connected)| wire::agent_info(a, connected))
                .collect(),
        }))
    }

    async fn revoke(
        &self,
        req: Request<pb::RevokeRequest>,
    ) -> Result<Response<pb::Revocation>, Status> {
        let admin = require(&req, "Revoke", &[Role::Admin])?;
        let r = req.into_inner();
        let store = self.0.revocations()?;
        Ok(Response::new(store.revoke(
            &r.role,
            &r.name,
            &admin.name,
        )?))
    }

    async fn list_revocations(
        &self,
        req: Request<pb::ListRevocationsRequest>,
    ) -> Result<Response<pb::RevocationList>, Status> {
        require(
            &req,
            "ListRevocations",
            &[Role::Admin, Role::Node, Role::Agent],
        )?;
        Ok(Response::new(self.0.revocations()?.list()))
    }

    async fn set_quota(&self, req: Request<pb::Quota>) -> Result<Response<pb::Quota>, Status> {
        let admin = require(&req, "SetQuota", &[Role::Admin])?;
        let order = req.into_inner().into();
        Ok(Response::new(wire::quota(self.0.set_quota(&admin, order)?)))
    }

    async fn list_quotas(
        &self,
        req: Request<pb::ListQuotasRequest>,
    ) -> Result<Response<pb::ListQuotasResponse>, Status> {
        require(&req, "ListQuotas", &[Role::Admin])?;
        let (quotas, fleet_default) = self.0.list_quotas()?;
        Ok(Response::new(pb::ListQuotasResponse {
            quotas: quotas.into_iter().map(wire::quota).collect(),
            fleet_default: Some(wire::quota(fleet_default)),
        }))
    }

    async fn set_retention(
        &self,
        req: Request<pb::SetRetentionRequest>,
    ) -> Result<Response<pb::SourceInfo>, Status> {
        let admin = require(&req, "SetRetention", &[Role::Admin])?;
        let order = req.into_inner().try_into()?;
        let s = self.0.set_retention(&admin, order)?;
        Ok(Response::new(wire::source_info(&self.0.registry(), s)))
    }

    async fn allow_group(
        &self,
        req: Request<pb::AllowGroupRequest>,
    ) -> Result<Response<pb::Group>, Status> {
        let admin = require(&req, "AllowGroup", &[Role::Admin])?;
        let r = req.into_inner();
        let (g, members) = self.0.allow_group(&admin, &r.group, &r.pattern, r.remove)?;
        Ok(Response::new(wire::group(&g, members)))
    }

    async fn lock(
        &self,
        req: Request<pb::LockRequest>,
    ) -> Result<Response<pb::LockResponse>, Status> {
        let caller = require(&req, "Lock", &[Role::Admin, Role::Officer])?;
        let order = req.into_inner().try_into()?;
        Ok(Response::new(self.0.set_lock(&caller, order).await?))
    }

    async fn remove_source(
        &self,
        req: Request<pb::RemoveSourceRequest>,
    ) -> Result<Response<pb::RemoveSourceResponse>, Status> {
        let admin = require(&req, "RemoveSource", &[Role::Admin])?;
        let source = req.into_inner().source;
        Ok(Response::new(self.0.remove(&admin, source).await?))
    }

    async fn list_workers(
        &self,
        req: Request<pb::ListWorkersRequest>,
    ) -> Result<Response<pb::ListWorkersResponse>, Status> {
        require(&req, "ListWorkers", &[Role::Admin])?;
        Ok(Response::new(self.0.workers()))
    }

    async fn forecast(
        &self,
        req: Request<pb::ForecastRequest>,
    ) -> Result<Response<pb::ForecastResponse>, Status> {
        require(&req, "Forecast", &[Role::Admin])?;
        let report = self.0.forecast().await?;
        Ok(Response::new(pb::ForecastResponse::from(&report)))
    }

    async fn get_coordinator_status(
        &self,
        req: Request<pb::GetCoordinatorStatusRequest>,
    ) -> Result<Response<pb::GetCoordinatorStatusResponse>, Status> {
        require(&req, "GetCoordinatorStatus", &[Role::Admin])?;
        Ok(Response::new(self.0.get_coordinator_status().await?))
    }

    async fn create_token(
        &self,
        req: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenResponse>, Status> {
        let admin = require(&req, "CreateToken", &[Role::Admin])?;
        let r = req.into_inner();
        let enroller = self.0.enroller()?;
        let (token, expires_at_ms) = enroller.create(&r.role, &r.name, r.ttl_ms, &r.dns, &r.ips)?;
        tracing::info!(%admin, role = %r.role, name = %r.name, "token issued");
        Ok(Response::new(pb::CreateTokenResponse {
            token,
            expires_at_ms,
        }))
    }

    async fn renew(
        &self,
        req: Request<pb::RenewRequest>,
    ) -> Result<Response<pb::RenewResponse>, Status> {
        let caller = require(&req, "Renew", &[Role::Node, Role::Agent])?;
        let presented = req
            .peer_certs()
            .and_then(|c| c.first().cloned())
            .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
        let r = req.into_inner();
        let enroller = self.0.enroller()?;
        let renewed = enroller.renew(caller.role, &caller.name, presented.as_ref(), &r)?;
        Ok(Response::new(renewed))
    }

    async fn list_sources(
        &self,
        req: Request<pb::ListSourcesRequest>,
    ) -> Result<Response<pb::ListSourcesResponse>, Status> {
        require(&req, "ListSources", &[Role::Admin])?;
        let registry = self.0.registry();
        let sources = (self.0.list_sources()?.into_iter())
            .map(|(s, progress)| pb::SourceInfo {
                progress: progress.map(Into::into),
                ..wire::source_info(&registry, s)
            })
            .collect();
        Ok(Response::new(pb::ListSourcesResponse { sources }))
    }

    async fn allocate(
        &self,
        req: Request<pb::AllocateRequest>,
    ) -> Result<Response<pb::AllocateResponse>, Status> {
        let admin = require(&req, "Allocate", &[Role::Admin])?;
        let order = req.into_inner().try_into()?;
        let s = self.0.allocate(&admin, order)?;
        Ok(Response::new(pb::AllocateResponse {
            source: Some(wire::source_info(&self.0.registry(), s)),
        }))
    }

    async fn list_alerts(
        &self,
        req: Request<pb::ListAlertsRequest>,
    ) -> Result<Response<pb::ListAlertsResponse>, Status> {
        require(&req, "ListAlerts", &[Role::Admin])?;
        let all = req.into_inner().all;
        let alerts = self.0.registry().alerts(all)?;
        Ok(Response::new(pb::ListAlertsResponse {
            alerts: alerts.iter().map(pb::Alert::from).collect(),
        }))
    }

    async fn locate(
        &self,
        req: Request<pb::LocateRequest>,
    ) -> Result<Response<pb::LocateResponse>, Status> {
        require(&req, "Locate", &[Role::Admin, Role::Officer])?;
        let source = req.into_inner().source;
        Ok(Response::new(self.0.locate(&source)?.into()))
    }

    async fn drain(
        &self,
        req: Request<pb::DrainRequest>,
    ) -> Result<Response<pb::MoveReport>, Status> {
        let admin = require(&req, "Drain", &[Role::Admin])?;
        let node = req.into_inner().node;
        Ok(Response::new(self.0.drain(&admin, node).await?))
    }

    async fn rebalance(
        &self,
        req: Request<pb::RebalanceRequest>,
    ) -> Result<Response<pb::MoveReport>, Status> {
        let admin = require(&req, "Rebalance", &[Role::Admin])?;
        let dry_run = req.into_inner().dry_run;
        Ok(Response::new(self.0.rebalance(&admin, dry_run).await?))
    }

    async fn put_group(&self, req: Request<pb::Group>) -> Result<Response<pb::Group>, Status> {
        let admin = require(&req, "PutGroup", &[Role::Admin])?;
        let g = req.into_inner().into();
        let (rec, members) = self.0.put_group(&admin, g)?;
        Ok(Response::new(wire::group(&rec, members)))
    }

    async fn list_groups(
        &self,
        req: Request<pb::ListGroupsRequest>,
    ) -> Result<Response<pb::ListGroupsResponse>, Status> {
        require(&req, "ListGroups", &[Role::Admin])?;
        let groups = self.0.list_groups()?;
        Ok(Response::new(pb::ListGroupsResponse {
            groups: groups
                .iter()
                .map(|(g, m)| wire::group(g, m.clone()))
                .collect(),
        }))
    }

    async fn delete_group(
        &self,
        req: Request<pb::DeleteGroupRequest>,
    ) -> Result<Response<pb::DeleteGroupResponse>, Status> {
        let admin = require(&req, "DeleteGroup", &[Role::Admin])?;
        let name = req.into_inner().name;
        self.0.delete_group(&admin, &name)?;
        Ok(Response::new(pb::DeleteGroupResponse {}))
    }

    async fn set_group(
        &self,
        req: Request<pb::SetGroupRequest>,
    ) -> Result<Response<pb::SetGroupResponse>, Status> {
        let admin = require(&req, "SetGroup", &[Role::Admin])?;
        let r = req.into_inner();
        self.0.set_group(&admin, &r.group, &r.sources)?;
        Ok(Response::new(pb::SetGroupResponse { sources: r.sources }))
    }

    async fn verify(
        &self,
        req: Request<pb::VerifyRequest>,
    ) -> Result<Response<pb::VerifyResponse>, Status> {
        let admin = require(&req, "Verify", &[Role::Admin])?;
        let r = req.into_inner();
        tracing::info!(%admin, source = %r.source, point = r.point, "verify requested");
        let report = self.0.verify(&r.source, r.point).await?;
        Ok(Response::new(pb::VerifyResponse {
            report: Some(report),
        }))
    }

    async fn list_points(
        &self,
        req: Request<pb::ListPointsRequest>,
    ) -> Result<Response<pb::ListPointsResponse>, Status> {
        require(&req, "ListPoints", &[Role::Admin])?;
        let source = req.into_inner().source;
        Ok(Response::new(self.0.list_points(&source).await?))
    }

    async fn sync(
        &self,
        req: Request<pb::SyncRequest>,
    ) -> Result<Response<pb::SyncResponse>, Status> {
        let admin = require(&req, "Sync", &[Role::Admin])?;
        let order = req.into_inner().into();
        let (agent, result) = self.0.sync(&admin, order).await?;
        Ok(Response::new(pb::SyncResponse { result, agent }))
    }

    async fn restore(
        &self,
        req: Request<pb::RestoreRequest>,
    ) -> Result<Response<pb::RestoreResponse>, Status> {
        let admin = require(&req, "Restore", &[Role::Admin])?;
        let order = req.into_inner().try_into()?;
        let (agent, result) = self.0.restore(&admin, order).await?;
        Ok(Response::new(pb::RestoreResponse { result, agent }))
    }
}
