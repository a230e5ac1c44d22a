% totals = [sum(c.values()) for _, c in series]
% peak = max(totals + [1])
<svg class="chart" viewBox="0 0 {{len(series) * 4}} 60" preserveAspectRatio="none" role="img" aria-label="finished tasks and failures">
% for i, (_, counts) in enumerate(series):
%   total = totals[i]
%   failed = counts.get('failed', 0) + counts.get('dead', 0)
%   if total:
  <rect class="ok" x="{{i * 4}}" y="{{'%.2f' % (60 - 60 * total / peak)}}" width="3" height="{{'%.2f' % (60 * total / peak)}}"><title>{{total}} finished, {{failed}} failed ({{'%.0f' % (100 * failed / total)}} %)</title></rect>
%   end
%   if failed:
  <rect class="bad" x="{{i * 4}}" y="{{'%.2f' % (60 - 60 * failed / peak)}}" width="3" height="{{'%.2f' % (60 * failed / peak)}}"></rect>
%   end
% end
</svg>
