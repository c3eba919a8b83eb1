{{- define "rewardserve.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "rewardserve.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "rewardserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "rewardserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "rewardserve.labels" -}}
{{ include "rewardserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* The bundled Redis: its name, and the URL the server uses (external url wins; they may not both be set). */}}
{{- define "rewardserve.redisName" -}}
{{- printf "%s-redis" (include "rewardserve.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Apart from the server's labels: the server's Service and Deployment must not select Redis' pod. */}}
{{- define "rewardserve.redisSelectorLabels" -}}
app.kubernetes.io/name: {{ include "rewardserve.name" . }}-redis
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: redis
{{- end -}}

{{- define "rewardserve.redisURL" -}}
{{- if .Values.redis.url -}}
{{- .Values.redis.url -}}
{{- else if .Values.redis.bundled.enabled -}}
{{- printf "redis://%s:6379/0" (include "rewardserve.redisName" .) -}}
{{- end -}}
{{- end -}}

{{/* The Secret holding the API keys file, if any. */}}
{{- define "rewardserve.apiKeysSecret" -}}
{{- if .Values.apiKeys.existingSecret -}}
{{- .Values.apiKeys.existingSecret -}}
{{- else if .Values.apiKeys.keys -}}
{{- printf "%s-api-keys" (include "rewardserve.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* Pods of this release, as a PromQL label matcher (KEDA queries). */}}
{{- define "rewardserve.podMatcher" -}}
namespace="{{ .Release.Namespace }}",pod=~"{{ include "rewardserve.fullname" . }}-.*"
{{- end -}}

{{/* The drain budget: preStop sleep + the server's drain + 10 s for the rest of shutdown. */}}
{{- define "rewardserve.gracePeriod" -}}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds -}}
{{- add (int .Values.lifecycle.preStopSeconds) (int (.Values.settings.drain_timeout_s | default 30)) 10 -}}
{{- else -}}
{{- .Values.terminationGracePeriodSeconds -}}
{{- end -}}
{{- end -}}
