{{/*
The chart name, cut to 63 characters (a DNS label).
*/}}
{{- define "docutray-bridge.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The full name of every object: release-chart, or the release name when it
already contains the chart name; cut to 63 characters.
*/}}
{{- define "docutray-bridge.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Name of the StatefulSet (or Deployment): the full name cut to 52 characters, since a
StatefulSet's pods carry a controller-revision-hash label of `<name>-<10 characters>`
that must fit in 63.
*/}}
{{- define "docutray-bridge.workloadName" -}}
{{- include "docutray-bridge.fullname" . | trunc 52 | trimSuffix "-" }}
{{- end }}

{{/*
Name of the StatefulSet's headless governing Service.
*/}}
{{- define "docutray-bridge.headlessName" -}}
{{- printf "%s-headless" (include "docutray-bridge.fullname" . | trunc 54 | trimSuffix "-") }}
{{- end }}

{{/*
Chart name and version for the helm.sh/chart label.
*/}}
{{- define "docutray-bridge.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels on every object.
*/}}
{{- define "docutray-bridge.labels" -}}
helm.sh/chart: {{ include "docutray-bridge.chart" . }}
{{ include "docutray-bridge.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: docutray-bridge
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Selector labels: immutable once the Deployment exists, so never add to them.
*/}}
{{- define "docutray-bridge.selectorLabels" -}}
app.kubernetes.io/name: {{ include "docutray-bridge.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
The ServiceAccount the pods run as.
*/}}
{{- define "docutray-bridge.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "docutray-bridge.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The container image: repository@digest, or repository:tag (tag defaults to appVersion).
*/}}
{{- define "docutray-bridge.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag | toString) }}
{{- end }}
{{- end }}

{{/*
Name of the Secret holding the API key.
*/}}
{{- define "docutray-bridge.apiKeySecretName" -}}
{{- default (include "docutray-bridge.fullname" .) .Values.docutray.existingSecret }}
{{- end }}

{{/*
Key of the API key inside its Secret.
*/}}
{{- define "docutray-bridge.apiKeySecretKey" -}}
{{- if .Values.docutray.existingSecret }}{{ .Values.docutray.existingSecretKey }}{{ else }}DOCUTRAY_API_KEY{{ end }}
{{- end }}

{{/*
Whether REDIS_URL is set at all ("true" or "").
*/}}
{{- define "docutray-bridge.redisEnabled" -}}
{{- if or .Values.redis.url .Values.redis.existingSecret }}true{{ end }}
{{- end }}

{{/*
Name of the Secret holding REDIS_URL.
*/}}
{{- define "docutray-bridge.redisSecretName" -}}
{{- default (include "docutray-bridge.fullname" .) .Values.redis.existingSecret }}
{{- end }}

{{/*
Key of REDIS_URL inside its Secret.
*/}}
{{- define "docutray-bridge.redisSecretKey" -}}
{{- if .Values.redis.existingSecret }}{{ .Values.redis.existingSecretKey }}{{ else }}REDIS_URL{{ end }}
{{- end }}

{{/*
Whether REDIS_URL goes into the chart's Secret ("true" or ""): given as a value whose
password is not completed from redis.passwordSecret.
*/}}
{{- define "docutray-bridge.redisUrlInSecret" -}}
{{- if and .Values.redis.url (not .Values.redis.existingSecret) (not .Values.redis.passwordSecret.name) }}true{{ end }}
{{- end }}

{{/*
REDIS_URL completed with the password of redis.passwordSecret at container start:
scheme://host... becomes scheme://:$(REDIS_PASSWORD)@host... (Kubernetes expands
$(REDIS_PASSWORD) from the variable defined before REDIS_URL).
*/}}
{{- define "docutray-bridge.redisUrlWithPassword" -}}
{{- $parts := splitn "://" 2 .Values.redis.url }}
{{- printf "%s://:$(REDIS_PASSWORD)@%s" $parts._0 $parts._1 }}
{{- end }}

{{/*
Whether the chart creates its own Secret ("true" or ""): for the API key when no
existing Secret is named, and for REDIS_URL when given as a value with its password.
*/}}
{{- define "docutray-bridge.createSecret" -}}
{{- if or (not .Values.docutray.existingSecret) (include "docutray-bridge.redisUrlInSecret" .) }}true{{ end }}
{{- end }}

{{/*
BRIDGE_EXPECTED_REPLICAS: explicit, else maxReplicas under autoscaling, else replicaCount.
*/}}
{{- define "docutray-bridge.expectedReplicas" -}}
{{- if .Values.expectedReplicas }}
{{- .Values.expectedReplicas | int }}
{{- else if .Values.autoscaling.enabled }}
{{- .Values.autoscaling.maxReplicas | int }}
{{- else }}
{{- .Values.replicaCount | int }}
{{- end }}
{{- end }}

{{/*
BRIDGE_MEMORY_BUDGET_MB: explicit, else the container's memory limit in MiB (a Kubernetes
quantity: 1Gi, 1536Mi, 2G, 800M, 1048576000...), else "" (the bridge's own default).
*/}}
{{- define "docutray-bridge.memoryBudgetMB" -}}
{{- if .Values.memoryBudgetMB }}
{{- .Values.memoryBudgetMB | int }}
{{- else }}
{{- $limit := "" }}
{{- with .Values.resources }}{{ with .limits }}{{ with .memory }}{{ $limit = toString . }}{{ end }}{{ end }}{{ end }}
{{- if $limit }}
{{- $number := regexFind "^[0-9.]+" $limit | float64 }}
{{- $suffix := regexReplaceAll "^[0-9.]+" $limit "" }}
{{- $perMiB := dict "Ki" (divf 1 1024) "Mi" 1.0 "Gi" 1024.0 "Ti" 1048576.0 "k" (divf 1000 1048576) "K" (divf 1000 1048576) "M" (divf 1000000 1048576) "G" (divf 1000000000 1048576) "T" (divf 1000000000000 1048576) "" (divf 1 1048576) }}
{{- if not (hasKey $perMiB $suffix) }}
{{- fail (printf "resources.limits.memory %q: unknown unit; set memoryBudgetMB" $limit) }}
{{- end }}
{{- $mib := mulf $number (get $perMiB $suffix) | floor | int64 }}
{{- if lt $mib 64 }}
{{- fail (printf "resources.limits.memory %s is under the bridge's minimum of 64Mi" $limit) }}
{{- end }}
{{- $mib }}
{{- end }}
{{- end }}
{{- end }}

{{/*
terminationGracePeriodSeconds: the drain timeout plus 5 s for the process to exit.
*/}}
{{- define "docutray-bridge.terminationGracePeriodSeconds" -}}
{{- add (ceil .Values.shutdownGraceSeconds | int) 5 }}
{{- end }}

{{/*
An environment variable value as text. Helm reads numbers in values as floats,
so whole numbers are printed as integers (16777216, not 1.6777216e+07).
*/}}
{{- define "docutray-bridge.envValue" -}}
{{- if kindIs "float64" . }}
{{- if eq (floor .) . }}{{ int64 . }}{{ else }}{{ . }}{{ end }}
{{- else }}
{{- . }}
{{- end }}
{{- end }}

{{/*
Every environment variable of the ConfigMap, as a dict: values derived from other
chart values first, then `settings` and `kafka.config` (which win).
*/}}
{{- define "docutray-bridge.configEnv" -}}
{{- $derived := dict
  "DOCUTRAY_BASE_URL" .Values.docutray.baseUrl
  "KAFKA_BOOTSTRAP_SERVERS" .Values.kafka.bootstrapServers
  "BRIDGE_TOPIC_PARTITIONS" .Values.kafka.inputPartitions
  "BRIDGE_EXPECTED_REPLICAS" (include "docutray-bridge.expectedReplicas" . | int)
  "BRIDGE_METRICS_PORT" .Values.metrics.port
  "BRIDGE_SHUTDOWN_GRACE_S" .Values.shutdownGraceSeconds
-}}
{{- with include "docutray-bridge.memoryBudgetMB" . }}
{{- $_ := set $derived "BRIDGE_MEMORY_BUDGET_MB" (. | int) }}
{{- end }}
{{- $env := merge (deepCopy (default dict .Values.kafka.config)) (deepCopy (default dict .Values.settings)) $derived -}}
{{- toYaml $env }}
{{- end }}

{{/*
Fail rendering on combinations that cannot work. Included by the workload.
*/}}
{{- define "docutray-bridge.validate" -}}
{{- if not (has .Values.workload.kind (list "StatefulSet" "Deployment")) }}
{{- fail (printf "workload.kind must be StatefulSet or Deployment, not %q" (toString .Values.workload.kind)) }}
{{- end }}
{{- if and (not .Values.docutray.apiKey) (not .Values.docutray.existingSecret) }}
{{- fail "a DocuTray API key is required: set docutray.existingSecret to a Secret holding it (key: docutray.existingSecretKey, default api-key), or docutray.apiKey" }}
{{- end }}
{{- if .Values.redis.passwordSecret.name }}
{{- if not .Values.redis.url }}
{{- fail "redis.passwordSecret needs redis.url (without the password), e.g. redis://my-redis-master:6379/0" }}
{{- end }}
{{- if .Values.redis.existingSecret }}
{{- fail "set redis.passwordSecret or redis.existingSecret, not both" }}
{{- end }}
{{- if not (regexMatch "^rediss?://[^@/]+(/.*)?$" .Values.redis.url) }}
{{- fail "with redis.passwordSecret, redis.url is redis://host:port/db or rediss://host:port/db, without a user or password" }}
{{- end }}
{{- end }}
{{- $partitions := .Values.kafka.inputPartitions | int }}
{{- if lt $partitions 1 }}
{{- fail "kafka.inputPartitions must be at least 1" }}
{{- end }}
{{- if not .Values.autoscaling.allowMoreReplicasThanPartitions }}
{{- if and .Values.autoscaling.enabled (gt (.Values.autoscaling.maxReplicas | int) $partitions) }}
{{- fail (printf "autoscaling.maxReplicas (%d) is more than kafka.inputPartitions (%d): extra replicas would get no partition. Lower maxReplicas, or set autoscaling.allowMoreReplicasThanPartitions=true." (.Values.autoscaling.maxReplicas | int) $partitions) }}
{{- end }}
{{- if and (not .Values.autoscaling.enabled) (gt (.Values.replicaCount | int) $partitions) }}
{{- fail (printf "replicaCount (%d) is more than kafka.inputPartitions (%d): extra replicas would get no partition. Lower replicaCount, or set autoscaling.allowMoreReplicasThanPartitions=true." (.Values.replicaCount | int) $partitions) }}
{{- end }}
{{- end }}
{{- if .Values.autoscaling.enabled }}
{{- if not (has .Values.autoscaling.type (list "hpa" "keda")) }}
{{- fail (printf "autoscaling.type must be hpa or keda, not %q" (toString .Values.autoscaling.type)) }}
{{- end }}
{{- if gt (.Values.autoscaling.minReplicas | int) (.Values.autoscaling.maxReplicas | int) }}
{{- fail "autoscaling.minReplicas is more than autoscaling.maxReplicas" }}
{{- end }}
{{- end }}
{{- if and .Values.docutray.apiKey .Values.docutray.existingSecret }}
{{- fail "set docutray.apiKey or docutray.existingSecret, not both" }}
{{- end }}
{{- if and .Values.redis.url .Values.redis.existingSecret }}
{{- fail "set redis.url or redis.existingSecret, not both" }}
{{- end }}
{{- range $name, $_ := .Values.kafka.config }}
{{- if not (hasPrefix "KAFKA_" $name) }}
{{- fail (printf "kafka.config keys are KAFKA_* variables; %q is not" $name) }}
{{- end }}
{{- if eq $name "KAFKA_BOOTSTRAP_SERVERS" }}
{{- fail "set kafka.bootstrapServers, not kafka.config.KAFKA_BOOTSTRAP_SERVERS" }}
{{- end }}
{{- if regexMatch "(?i)(PASSWORD|SECRET|KEY|TOKEN|CREDENTIAL|JAAS)" $name }}
{{- fail (printf "kafka.config.%s looks secret: put it in the Secret named by kafka.existingSecret" $name) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Whether BRIDGE_WEBHOOKS_ENABLED is on ("true" or ""), and the webhook port.
*/}}
{{- define "docutray-bridge.webhooksEnabled" -}}
{{- if eq (toString (get (include "docutray-bridge.configEnv" . | fromYaml) "BRIDGE_WEBHOOKS_ENABLED")) "true" }}true{{ end }}
{{- end }}

{{- define "docutray-bridge.webhookPort" -}}
{{- get (include "docutray-bridge.configEnv" . | fromYaml) "BRIDGE_WEBHOOK_PORT" | default 9401 | int }}
{{- end }}
