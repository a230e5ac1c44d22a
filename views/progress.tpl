% if row.progress_total:
<progress max="{{row.progress_total}}" value="{{row.progress_done or 0}}" data-task="{{row.id}}">{{row.progress_done or 0}}/{{row.progress_total}}</progress> {{row.progress_done or 0}}/{{row.progress_total}}
% end
