//! Daily cost alerts (SPEC §4.4): when a tenant's spend for a UTC day reaches its threshold
//! (`costAlertThreshold` in its settings, else `COST_ALERT_THRESHOLD`), one warning log line,
//! one `meta_chat_cost_alerts_total` increment and, when `COST_ALERT_WEBHOOK_URL` is set, one
//! webhook event.
//!
//! The usage writer calls [`CostAlerts::check`] after each batch is stored, so the day's spend
//! is read from the day rollups every replica writes to. An alert is claimed with an insert
//! into `cost_alerts` keyed by tenant and day, so it fires once per tenant per day whatever
//! the number of replicas and restarts. Webhooks are delivered by their own tasks, retried
//! with backoff, and never hold up the writer or a request.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use chrono::{NaiveDate, SecondsFormat, Utc};
use meta_chat_llm::pricing::format_usd;
use serde::Serialize;
use tokio::task::JoinSet;

use crate::metrics::Metrics;
use crate::store::{Store, UsageRecord};

/// How a webhook is delivered.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// Where events are POSTed.
    pub url: String,
    /// Attempts per event, the first included.
    pub attempts: u32,
    /// Time allowed for one attempt.
    pub timeout: Duration,
    /// Wait before the second attempt; doubled before each further one.
    pub backoff: Duration,
}

impl WebhookConfig {
    /// Four attempts (waiting 1, 2 and 4 s between them), 5 s each.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            attempts: 4,
            timeout: Duration::from_secs(5),
            backoff: Duration::from_secs(1),
        }
    }
}

/// The JSON body POSTed to the webhook.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CostAlertEvent {
    /// Always `cost_alert`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// `{tenantId}:{day}`: the same for every delivery attempt of one alert, for
    /// de-duplication by the receiver.
    pub id: String,
    /// The tenant.
    pub tenant_id: String,
    /// The UTC day, `YYYY-MM-DD`.
    pub day: NaiveDate,
    /// The threshold, USD as a decimal string.
    pub threshold_usd: String,
    /// The day's spend when the alert fired, USD as a decimal string.
    pub spent_usd: String,
    /// When the alert fired (RFC 3339).
    pub fired_at: String,
}

/// Watches daily spend and raises alerts. Shared by the usage writer.
#[derive(Debug)]
pub struct CostAlerts {
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    webhook: Option<WebhookConfig>,
    client: reqwest::Client,
    /// Tenant days already alerted (here or on another replica): no need to ask again.
    settled: Mutex<HashSet<(String, NaiveDate)>>,
    deliveries: Mutex<JoinSet<()>>,
}

impl CostAlerts {
    /// Alerts over `store`, counted in `metrics`, POSTed to `webhook` when given.
    pub fn new(
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
        webhook: Option<WebhookConfig>,
    ) -> Arc<Self> {
        Arc::new(Self {
            store,
            metrics,
            webhook,
            client: reqwest::Client::new(),
            settled: Mutex::default(),
            deliveries: Mutex::new(JoinSet::new()),
        })
    }

    /// Checks the tenant days of a stored batch against their thresholds (`thresholds[i]` is
    /// the threshold of `records[i]` in nano-dollars, `None` for no alert) and fires the alerts
    /// that are due. Database failures are logged; the next batch checks again.
    pub async fn check(&self, records: &[UsageRecord], thresholds: &[Option<i64>]) {
        let mut due: BTreeMap<(&str, NaiveDate), i64> = BTreeMap::new();
        for (record, threshold) in records.iter().zip(thresholds) {
            if let Some(threshold) = *threshold {
                due.insert(
                    (record.tenant_id.as_str(), record.created_at.date_naive()),
                    threshold,
                );
            }
        }
        for ((tenant, day), threshold) in due {
            if self.is_settled(tenant, day) {
                continue;
            }
            if let Err(error) = self.check_day(tenant, day, threshold).await {
                tracing::warn!(%error, tenant, %day, "cannot check the daily cost alert");
            }
        }
    }

    fn is_settled(&self, tenant: &str, day: NaiveDate) -> bool {
        self.settled
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&(tenant.to_owned(), day))
    }

    async fn check_day(
        &self,
        tenant: &str,
        day: NaiveDate,
        threshold: i64,
    ) -> Result<(), crate::store::StoreError> {
        let spent = self.store.day_cost(tenant, day).await?;
        if spent < threshold {
            return Ok(());
        }
        let claimed = self
            .store
            .claim_cost_alert(tenant, day, threshold, spent)
            .await?;
        {
            let mut settled = self.settled.lock().unwrap_or_else(PoisonError::into_inner);
            // Yesterday's entries are no longer needed.
            let today = Utc::now().date_naive();
            settled.retain(|(_, d)| *d >= today.pred_opt().unwrap_or(today));
            settled.insert((tenant.to_owned(), day));
        }
        if !claimed {
            return Ok(()); // Another replica (or an earlier run) already raised it.
        }
        let event = CostAlertEvent {
            kind: "cost_alert",
            id: format!("{tenant}:{day}"),
            tenant_id: tenant.to_owned(),
            day,
            threshold_usd: format_usd(u64::try_from(threshold).unwrap_or(0)),
            spent_usd: format_usd(u64::try_from(spent).unwrap_or(0)),
            fired_at: Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true),
        };
        tracing::warn!(
            tenant,
            %day,
            spent_usd = %event.spent_usd,
            threshold_usd = %event.threshold_usd,
            "daily cost alert: the tenant's spend reached its threshold"
        );
        self.metrics.record_cost_alert(tenant);
        if let Some(webhook) = &self.webhook {
            let delivery = deliver(self.client.clone(), webhook.clone(), event);
            let mut deliveries = self
                .deliveries
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            while deliveries.try_join_next().is_some() {}
            deliveries.spawn(delivery);
        }
        Ok(())
    }

    /// Waits up to `limit` for webhook deliveries still in progress (at shutdown).
    pub async fn finish(&self, limit: Duration) {
        let mut deliveries = std::mem::take(
            &mut *self
                .deliveries
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        if deliveries.is_empty() {
            return;
        }
        if tokio::time::timeout(limit, async {
            while deliveries.join_next().await.is_some() {}
        })
        .await
        .is_err()
        {
            tracing::warn!(
                pending = deliveries.len(),
                "cost alert webhooks still undelivered at shutdown"
            );
        }
    }
}

/// POSTs `event`, retrying on failures and non-2xx answers.
async fn deliver(client: reqwest::Client, webhook: WebhookConfig, event: CostAlertEvent) {
    let mut wait = webhook.backoff;
    for attempt in 1..=webhook.attempts.max(1) {
        let sent = client
            .post(&webhook.url)
            .timeout(webhook.timeout)
            .header("x-meta-chat-event", "cost_alert")
            .json(&event)
            .send()
            .await;
        let failure = match sent {
            Ok(response) if response.status().is_success() => {
                tracing::info!(tenant = %event.tenant_id, day = %event.day, attempt, "cost alert webhook delivered");
                return;
            }
            Ok(response) => format!("the webhook answered {}", response.status()),
            // Without the URL: it may carry a token.
            Err(error) => format!("the webhook cannot be reached: {}", error.without_url()),
        };
        if attempt == webhook.attempts.max(1) {
            tracing::error!(tenant = %event.tenant_id, day = %event.day, attempt, failure, "cost alert webhook not delivered; giving up");
            return;
        }
        tracing::warn!(tenant = %event.tenant_id, day = %event.day, attempt, failure, "cost alert webhook failed; retrying");
        tokio::time::sleep(wait).await;
        wait *= 2;
    }
}
