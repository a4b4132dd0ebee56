//! The gRPC service: each handler checks and converts its request, calls the
//! coordinator, and converts the reply. Nothing else happens here.

use swiftbrush_proto::rpc::{self, coordinator_server::Coordinator as CoordinatorRpc};
use tonic::{Request, Response, Status};

use super::replies;
use super::requests::{self, CheckpointCall, PublishCall};
use crate::app::Coordinator;
use crate::domain::{CaptionRequest, HeartbeatInput, RegisterInput};

type Reply<T> = Result<Response<T>, Status>;

#[derive(Debug, Clone)]
pub struct CoordinatorService {
    app: Coordinator,
}

impl CoordinatorService {
    pub fn new(app: Coordinator) -> Self {
        Self { app }
    }
}

#[tonic::async_trait]
impl CoordinatorRpc for CoordinatorService {
    async fn register(&self, request: Request<rpc::RegisterRequest>) -> Reply<rpc::RegisterReply> {
        let input = RegisterInput::try_from(request.into_inner())?;
        let (registration, job) = self.app.register(input)?;
        Ok(Response::new(replies::register_reply(registration, job)))
    }

    async fn rendezvous(
        &self,
        request: Request<rpc::RendezvousRequest>,
    ) -> Reply<rpc::RendezvousReply> {
        let req = request.into_inner();
        let worker = requests::checked_worker(req.worker_id)?;
        let outcome = (self.app)
            .rendezvous(
                worker,
                req.known_generation,
                &requests::fingerprint(req.teacher_fingerprint)?,
                requests::wait(req.wait_ms),
            )
            .await?;
        Ok(Response::new(replies::rendezvous_reply(
            outcome,
            self.app.job_info(),
        )))
    }

    async fn publish_bootstrap(
        &self,
        request: Request<rpc::PublishBootstrapRequest>,
    ) -> Reply<rpc::PublishBootstrapReply> {
        let call = PublishCall::try_from(request.into_inner())?;
        (self.app).publish_bootstrap(call.worker, call.generation, call.rank, call.blob)?;
        Ok(Response::new(rpc::PublishBootstrapReply {}))
    }

    async fn fetch_bootstrap(
        &self,
        request: Request<rpc::FetchBootstrapRequest>,
    ) -> Reply<rpc::FetchBootstrapReply> {
        let req = request.into_inner();
        let worker = requests::checked_worker(req.worker_id)?;
        let view = (self.app)
            .fetch_bootstrap(
                worker,
                req.generation,
                req.all_ranks,
                requests::wait(req.wait_ms),
            )
            .await?;
        Ok(Response::new(view.into()))
    }

    async fn get_captions(
        &self,
        request: Request<rpc::GetCaptionsRequest>,
    ) -> Reply<rpc::GetCaptionsReply> {
        let req = CaptionRequest::try_from(request.into_inner())?;
        let steps = self.app.captions(req)?;
        Ok(Response::new(replies::captions_reply(steps)))
    }

    async fn heartbeat(
        &self,
        request: Request<rpc::HeartbeatRequest>,
    ) -> Reply<rpc::HeartbeatReply> {
        let input = HeartbeatInput::try_from(request.into_inner())?;
        let ack = self.app.heartbeat(input)?;
        Ok(Response::new(ack.into()))
    }

    async fn report_checkpoint(
        &self,
        request: Request<rpc::ReportCheckpointRequest>,
    ) -> Reply<rpc::ReportCheckpointReply> {
        let call = CheckpointCall::try_from(request.into_inner())?;
        let committed = self.app.report_checkpoint(call.report, call.staged).await?;
        Ok(Response::new(committed.into()))
    }

    async fn leave(&self, request: Request<rpc::LeaveRequest>) -> Reply<rpc::LeaveReply> {
        let req = request.into_inner();
        let worker = requests::checked_worker(req.worker_id)?;
        if req.failed {
            self.app
                .worker_failed(worker, requests::failure_reason(req.reason)?)?;
        } else {
            self.app.leave(worker, requests::reason(req.reason)?)?;
        }
        Ok(Response::new(rpc::LeaveReply {}))
    }

    async fn job_status(
        &self,
        _request: Request<rpc::JobStatusRequest>,
    ) -> Reply<rpc::JobStatusReply> {
        Ok(Response::new(self.app.status().into()))
    }

    async fn submit_job(
        &self,
        request: Request<rpc::SubmitJobRequest>,
    ) -> Reply<rpc::SubmitJobReply> {
        let yaml = requests::config_yaml(request.into_inner().config_yaml)?;
        let submitted = self.app.submit_yaml(&yaml).await?;
        Ok(Response::new(submitted.into()))
    }

    async fn cancel_job(
        &self,
        request: Request<rpc::CancelJobRequest>,
    ) -> Reply<rpc::CancelJobReply> {
        let request = request.into_inner();
        let reason = requests::reason(request.reason)?;
        if request.final_checkpoint {
            let step = self.app.cancel_after_checkpoint(reason)?;
            let phase = self.app.status().phase;
            Ok(Response::new(replies::cancel_reply(phase, step)))
        } else {
            let phase = self.app.cancel(reason)?;
            Ok(Response::new(replies::cancel_reply(phase, None)))
        }
    }
}
