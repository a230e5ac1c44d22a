<section class="cards">
  % if queue is not None:
  <div class="card"><h2>Queue depth</h2><p class="big" id="queue-depth">{{queue['depth']}}</p>
    <table class="small"><tr><th>priority</th>
    % for priority in queue['by_priority']:
    <td>{{priority}}</td>
    % end
    </tr><tr><th>waiting</th>
    % for count in queue['by_priority'].values():
    <td>{{count}}</td>
    % end
    </tr></table>
    <table class="small" id="lane-depth"><tr><th>lane</th>
    % for lane in queue['by_lane']:
    <td>{{lane}}</td>
    % end
    </tr><tr><th>waiting</th>
    % for lane, waiting in queue['by_lane'].items():
    <td id="lane-{{lane}}">{{waiting['depth']}}</td>
    % end
    </tr></table>
  </div>
  % end
  <div class="card"><h2>Now</h2>
    <p><span class="big" id="count-pending">{{active.get('pending', 0)}}</span> pending ·
       <span class="big" id="count-running">{{active.get('running', 0)}}</span> running ·
       <span class="big" id="count-retrying">{{active.get('retrying', 0)}}</span> retrying</p>
    <p>Oldest waiting: <span id="oldest">{{duration(oldest) if oldest is not None else 'none'}}</span></p>
  </div>
  % for label, key in (('Last hour', 'hour'), ('Last day', 'day')):
  <div class="card"><h2>{{label}}</h2>
    <table class="small">
    % for state in ('succeeded', 'failed', 'dead', 'revoked'):
      <tr><th>{{state}}</th><td id="{{key}}-{{state}}">{{finished[key].get(state, 0)}}</td></tr>
    % end
    </table>
  </div>
  % end
</section>
<section class="charts">
  % for label, series, step in (('Finished per minute, last hour', finished['per_minute'], 'minute'), ('Finished per 10 minutes, last day', finished['per_10'], '10 minutes')):
  <figure>
    <figcaption>{{label}} <span class="key ok">done</span> <span class="key bad">failed or dead</span></figcaption>
    % include('chart.tpl', series=series)
  </figure>
  % end
</section>
<section>
  <h2>Running</h2>
  % include('running.tpl', rows=running)
</section>
