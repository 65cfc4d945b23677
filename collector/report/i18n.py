"""Every word a report prints, in Chinese and English, and how it writes dates and times.

The operators of a city's extranet read Chinese; vendors and auditors often English. One table
per language (``LABELS[lang][key]``), the same keys in both (a test checks), so a template never
holds a word of its own. Severity, status, migration state and action names are translated here
too; the names an operator or an agent gave (departments, counties, zones, hosts) are data and
are printed as they are.
"""

from __future__ import annotations

from datetime import datetime

LANGS = ("zh", "en")

# A Chinese font installed on the machine that prints the report: none is downloaded. Latin text
# is set in the same faces, which carry it.
FONT_STACK = (
    '"Noto Sans CJK SC", "Source Han Sans SC", "WenQuanYi Micro Hei", "Microsoft YaHei", '
    '"PingFang SC", sans-serif'
)

HTML_LANG = {"zh": "zh-CN", "en": "en"}

_EN_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")

LABELS: dict[str, dict[str, str]] = {
    "zh": {
        "title": "电子政务外网安全监测报告",
        "incident_title": "安全事件报告",
        "subtitle": "zonewatch 网络与数据安全监测",
        "period": "报告期间",
        "filters": "范围",
        "all_hosts": "全部主机",
        "department": "部门",
        "county": "区县",
        "generated": "生成时间",
        "contents": "目录",
        "to": "至",
        "colon": "：",
        "data_note": "本报告的全部数字与同一期间 zonewatch-collector 命令行的输出一致。",
        # (a) summary
        "summary": "一、事件概况",
        "incidents_seen": "期间内出现的事件",
        "incidents_new": "其中新发生",
        "by_severity": "按严重程度",
        "by_status": "按处理状态",
        "count": "数量",
        "per_day": "每日新增事件（按严重程度）",
        "day": "日期",
        "incidents_axis": "事件数",
        # (b) incidents
        "incidents": "二、事件详情",
        "incidents_omitted": "另有 {count} 起事件未列出（按严重程度仅列前 {shown} 起），可用 "
        "zonewatch-collector incidents list 查看。",
        "no_incidents": "期间内没有事件。",
        "incident": "事件",
        "severity": "严重程度",
        "status": "状态",
        "rule": "规则",
        "host": "主机",
        "first_seen": "首次发现",
        "last_seen": "最近发现",
        "matches": "命中次数",
        "dedup": "去重字段",
        "evidence": "证据事件",
        "evidence_shown": "共 {count} 条，按时间先后",
        "time": "时间",
        "category": "类别",
        "details": "内容",
        "other_evidence": "其他证据",
        "processes": "相关进程",
        "process": "进程",
        "pid": "PID",
        "user": "用户",
        "cmdline": "命令行",
        "lifecycle": "处理记录",
        "no_actions": "尚无处理记录。",
        "actor": "操作人",
        "action": "操作",
        "change": "状态变化",
        "comment": "说明",
        # (c) links
        "links": "三、外网链路负载",
        "links_note": "链路负载为全市所有主机经该链路的流量之和，不按部门或区县区分；"
        "速率按 {bucket} 时间桶计算，p95 与峰值按桶取值。",
        "links_coarser": "所查期间早于原始数据保留期，速率按 {bucket} 时间桶计算。",
        "no_links": "期间内没有外网链路（纵向、横向）的流量记录。",
        "vertical": "纵向",
        "horizontal": "横向",
        "capacity": "带宽",
        "unknown_capacity": "未登记",
        "p95_in": "入 p95",
        "p95_out": "出 p95",
        "peak_in": "入峰值",
        "peak_out": "出峰值",
        "load_p95": "p95 负载",
        "load_peak": "峰值负载",
        "whole_period": "全期",
        "no_traffic": "无流量",
        "rate_axis": "速率",
        # (d) migration
        "migration": "四、专网迁移进度",
        "by_department": "按部门",
        "by_county": "按区县",
        "pairs": "主机/专网对",
        "percent_migrated": "迁移率",
        "overall": "合计",
        "regressed_hosts": "迁移后回退的主机",
        "no_regressed": "没有回退的主机。",
        "network": "专网",
        "since": "自",
        "expiring": "14 天内到期的豁免",
        "no_expiring": "没有 14 天内到期的豁免。",
        "reason": "原因",
        "approved_by": "批准人",
        "reference": "批准文号",
        "expires": "到期时间",
        "trend": "迁移趋势（每日末各状态主机/专网对数）",
        "trend_filtered": "迁移趋势按全市统计，筛选部门或区县时不显示。",
        # (e) coverage
        "coverage": "五、监测覆盖情况",
        "agents": "采集端",
        "agents_total": "采集端总数",
        "silent": "失联或迟滞的采集端",
        "no_silent": "所有采集端均在线。",
        "capture": "抓包丢失",
        "capture_summary": "{agents} 个采集端报告抓包数据：共 {packets} 个包，"
        "丢失 {drops} 个（{fraction}）。",
        "no_capture_loss": "没有采集端报告抓包丢失。",
        "captured": "抓包数",
        "dropped": "丢失",
        "drop_fraction": "丢失率",
        "rejected": "被拒绝的输入（按原因）",
        "rejected_note": "被拒绝的输入按原因统计，不区分部门或区县。",
        "no_rejected": "期间内没有被拒绝的输入。",
        "code": "代码",
        "field": "字段",
        "times": "次数",
        "example": "最近一条消息",
        "last_seen_agent": "最后联系",
        # names
        "severity.informational": "提示",
        "severity.low": "低",
        "severity.medium": "中",
        "severity.high": "高",
        "severity.critical": "严重",
        "status.open": "待处理",
        "status.acknowledged": "已确认",
        "status.resolved": "已解决",
        "status.false_positive": "误报",
        "state.not_started": "未开始",
        "state.dual_homed": "双归属",
        "state.migrated": "已迁移",
        "state.regressed": "回退",
        "state.exempt": "豁免",
        "state.unknown": "未知",
        "agent.online": "在线",
        "agent.stale": "迟滞",
        "agent.offline": "离线",
        "action.acknowledge": "确认",
        "action.resolve": "解决",
        "action.false_positive": "标记误报",
        "action.reopen": "重新打开",
        "action.comment": "备注",
        # formats
        "month_day": "{month}月{day}日",
        "datetime": "{year}年{month}月{day}日 {hour:02d}:{minute:02d}",
    },
    "en": {
        "title": "Government extranet security monitoring report",
        "incident_title": "Incident report",
        "subtitle": "zonewatch network and data-security monitoring",
        "period": "Period",
        "filters": "Scope",
        "all_hosts": "all hosts",
        "department": "Department",
        "county": "County",
        "generated": "Generated",
        "contents": "Contents",
        "to": "to",
        "colon": ": ",
        "data_note": "Every figure in this report is what zonewatch-collector's commands print for the "
        "same period.",
        "summary": "1. Incidents at a glance",
        "incidents_seen": "Incidents seen in the period",
        "incidents_new": "of which new",
        "by_severity": "By severity",
        "by_status": "By status",
        "count": "Count",
        "per_day": "New incidents per day, by severity",
        "day": "Day",
        "incidents_axis": "incidents",
        "incidents": "2. Incidents",
        "incidents_omitted": "{count} more incidents are not listed (the {shown} most severe are); "
        "zonewatch-collector incidents list shows them.",
        "no_incidents": "No incident in the period.",
        "incident": "Incident",
        "severity": "Severity",
        "status": "Status",
        "rule": "Rule",
        "host": "Host",
        "first_seen": "First seen",
        "last_seen": "Last seen",
        "matches": "Matches",
        "dedup": "Deduplicated by",
        "evidence": "Evidence events",
        "evidence_shown": "{count}, oldest first",
        "time": "Time",
        "category": "Category",
        "details": "Details",
        "other_evidence": "Other evidence",
        "processes": "Processes",
        "process": "Process",
        "pid": "PID",
        "user": "User",
        "cmdline": "Command line",
        "lifecycle": "Actions taken",
        "no_actions": "No action taken yet.",
        "actor": "By",
        "action": "Action",
        "change": "Status change",
        "comment": "Comment",
        "links": "3. Extranet link load",
        "links_note": "A link's load is the traffic of every host in the city over it, whatever the "
        "department or county; rates are over {bucket} buckets, p95 and peak over those buckets.",
        "links_coarser": "The period is older than the raw data kept: rates are over {bucket} buckets.",
        "no_links": "No traffic on the extranet links (vertical, horizontal) in the period.",
        "vertical": "vertical",
        "horizontal": "horizontal",
        "capacity": "Capacity",
        "unknown_capacity": "not recorded",
        "p95_in": "p95 in",
        "p95_out": "p95 out",
        "peak_in": "peak in",
        "peak_out": "peak out",
        "load_p95": "p95 load",
        "load_peak": "peak load",
        "whole_period": "whole period",
        "no_traffic": "no traffic",
        "rate_axis": "rate",
        "migration": "4. Dedicated-network migration",
        "by_department": "By department",
        "by_county": "By county",
        "pairs": "host/network pairs",
        "percent_migrated": "migrated",
        "overall": "All",
        "regressed_hosts": "Hosts back on a dedicated network after migrating",
        "no_regressed": "No host has regressed.",
        "network": "Network",
        "since": "Since",
        "expiring": "Exemptions expiring within 14 days",
        "no_expiring": "No exemption expires within 14 days.",
        "reason": "Reason",
        "approved_by": "Approved by",
        "reference": "Reference",
        "expires": "Expires",
        "trend": "Migration trend (host/network pairs per state at the end of each day)",
        "trend_filtered": "The migration trend is the whole city's: it is not shown for a department "
        "or county.",
        "coverage": "5. Monitoring coverage",
        "agents": "Agents",
        "agents_total": "agents",
        "silent": "Agents offline or late",
        "no_silent": "Every agent is online.",
        "capture": "Packet capture loss",
        "capture_summary": "{agents} agents reported capture figures: {packets} packets, {drops} dropped "
        "({fraction}).",
        "no_capture_loss": "No agent reported capture drops.",
        "captured": "Captured",
        "dropped": "Dropped",
        "drop_fraction": "Loss",
        "rejected": "Rejected input, by reason",
        "rejected_note": "Rejected input is counted per reason, not per department or county.",
        "no_rejected": "Nothing was rejected in the period.",
        "code": "Code",
        "field": "Field",
        "times": "Times",
        "example": "Newest message",
        "last_seen_agent": "Last contact",
        "severity.informational": "informational",
        "severity.low": "low",
        "severity.medium": "medium",
        "severity.high": "high",
        "severity.critical": "critical",
        "status.open": "open",
        "status.acknowledged": "acknowledged",
        "status.resolved": "resolved",
        "status.false_positive": "false positive",
        "state.not_started": "not started",
        "state.dual_homed": "dual-homed",
        "state.migrated": "migrated",
        "state.regressed": "regressed",
        "state.exempt": "exempt",
        "state.unknown": "unknown",
        "agent.online": "online",
        "agent.stale": "late",
        "agent.offline": "offline",
        "action.acknowledge": "acknowledged",
        "action.resolve": "resolved",
        "action.false_positive": "marked a false positive",
        "action.reopen": "reopened",
        "action.comment": "comment",
        "month_day": "{day} {mon}",
        "datetime": "{year}-{month:02d}-{day:02d} {hour:02d}:{minute:02d}",
    },
}


def check_lang(lang: str) -> str:
    if lang not in LABELS:
        raise ValueError(f"unknown report language {lang!r}: use {' or '.join(LANGS)}")
    return lang


def lang_of_locale(locale: str | None) -> str:
    """The report language for a POSIX locale name: zh_CN.UTF-8, zh_TW, zh -> zh; anything else en."""
    return "zh" if (locale or "").lower().startswith("zh") else "en"


def name(lang: str, kind: str, value: str) -> str:
    """A severity, status, state, agent status or action in the language; unknown ones as they are."""
    return LABELS[lang].get(f"{kind}.{value}", value.replace("_", " "))


def _fields(ms: int) -> dict[str, int | str]:
    moment = datetime.fromtimestamp(ms / 1000)
    return {
        "year": moment.year,
        "month": moment.month,
        "mon": _EN_MONTHS[moment.month - 1],
        "day": moment.day,
        "hour": moment.hour,
        "minute": moment.minute,
    }


def format_datetime(ms: int, lang: str) -> str:
    """ms since the epoch, in local time: 2026年11月28日 07:40 / 2026-11-28 07:40."""
    return LABELS[lang]["datetime"].format(**_fields(ms))


def format_day(day: str, lang: str) -> str:
    """A YYYY-MM-DD day as a chart labels it: 11月28日 / 28 Nov."""
    year, month, dom = (int(part) for part in day.split("-"))
    return LABELS[lang]["month_day"].format(month=month, day=dom, mon=_EN_MONTHS[month - 1], year=year)
