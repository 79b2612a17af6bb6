"""Every Prometheus metric imagebus exposes: names and labels are a contract (dashboards, the
alerts in deploy/k8s, autoscaling), so they live here, in one place, like the message schemas.

Each role counts what it alone sees and serves its own process's registry on ``/metrics``:

- ingress: HTTP requests, submissions, queue depth per queue (sampled from the broker);
- workers: time in queue, job duration, how busy their slots are;
- projector: jobs reaching each status (it is the one place that sees every job's every move,
  whoever made it: a worker, a cancel at the ingress, the stall watchdog), stalled jobs;
- reaper: images expired.

Label values are bounded: routes are templates, models come from the catalog, backends and
statuses are fixed sets.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# Seconds, from a fast remote call to a long diffusion batch.
_JOB_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800)

HTTP_REQUESTS = Counter(
    "imagebus_http_requests",
    "HTTP requests answered by the ingress, by route template, method and status code.",
    ["route", "method", "code"],
)
HTTP_REQUEST_DURATION = Histogram(
    "imagebus_http_request_duration_seconds",
    "Time to the response's first byte (event streams: to their opening).",
    ["route", "method"],
)
JOBS_SUBMITTED = Counter(
    "imagebus_jobs_submitted",
    "Jobs accepted and queued by the ingress (a replayed idempotent submit is not counted again).",
    ["backend", "model"],
)
JOBS = Counter(
    "imagebus_jobs",
    "Jobs reaching a status (processing, completed, failed, canceled), counted by the projector.",
    ["status", "backend", "model"],
)
JOBS_STALLED = Counter(
    "imagebus_jobs_stalled",
    "Processing jobs the stall watchdog failed because no event came for too long.",
)
QUEUE_DEPTH = Gauge(
    "imagebus_queue_depth",
    "Commands waiting or running on a work queue (a backend's shared queue or a catalog pool's).",
    ["backend", "queue"],
)
JOB_QUEUE_SECONDS = Histogram(
    "imagebus_job_queue_seconds",
    "Time from submission to a worker starting the job (each attempt).",
    ["backend", "model"],
    buckets=_JOB_BUCKETS,
)
JOB_DURATION = Histogram(
    "imagebus_job_duration_seconds",
    "Time from a worker starting a job to its images being stored, for completed jobs.",
    ["backend", "model"],
    buckets=_JOB_BUCKETS,
)
WORKER_SLOTS = Gauge(
    "imagebus_worker_slots",
    "Runs a worker may have at once (its backend's concurrency).",
    ["backend"],
)
WORKER_BUSY_RATIO = Gauge(
    "imagebus_worker_busy_ratio",
    "Fraction of a worker's slots running a job right now.",
    ["backend"],
)
WORKER_BUSY_SECONDS = Counter(
    "imagebus_worker_busy_seconds",
    "Slot-seconds spent running jobs; rate() over imagebus_worker_slots is the busy fraction.",
    ["backend"],
)
IMAGES_EXPIRED = Counter(
    "imagebus_images_expired",
    "Images the reaper deleted at their expiry.",
)
