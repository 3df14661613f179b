using System.Net;
using System.Net.Sockets;

namespace DmaBroker.Cluster.Tests;

/// <summary>
/// A loopback TCP forwarder in front of an etcd member, so a test can cut one replica off from
/// etcd (a partition, or a dead replica as etcd sees it) while the others keep talking to it, heal
/// the cut, or let the replica's requests through while holding back the member's answers.
/// </summary>
public sealed class TcpProxy : IAsyncDisposable
{
    // Replaced when a cut heals, on the same port: while cut, connections are refused.
    private TcpListener _listener = new(IPAddress.Loopback, 0);
    private readonly Uri _target;
    private readonly List<TcpClient> _connections = [];
    private readonly CancellationTokenSource _stop = new();
    private Task _accept;
    // Completed while the member's answers flow; replaced by an open one while they are held.
    private volatile TaskCompletionSource _answers = Flowing();
    private volatile bool _cut;

    public TcpProxy(Uri target)
    {
        _target = target;
        _listener.Start();
        Endpoint = new Uri($"http://127.0.0.1:{((IPEndPoint)_listener.LocalEndpoint).Port}");
        _accept = AcceptAsync(_listener);
    }

    /// <summary>Where a replica connects instead of the member.</summary>
    public Uri Endpoint { get; }

    /// <summary>Closes every connection and refuses new ones: nothing gets through until <see cref="Heal"/>.</summary>
    public void Cut()
    {
        lock (_connections)
        {
            if (_cut)
                return;
            _cut = true;
            _listener.Stop();
        }
        lock (_connections)
        {
            foreach (var c in _connections)
                c.Dispose();
            _connections.Clear();
        }
    }

    /// <summary>Connections get through again, on the same port (the ones cut stay closed: the replica connects anew).</summary>
    public void Heal()
    {
        lock (_connections)
        {
            if (!_cut || _stop.IsCancellationRequested)
                return;
            _listener = new TcpListener(IPAddress.Loopback, Endpoint.Port);
            _listener.Start();
            _cut = false;
            _accept = Task.WhenAll(_accept, AcceptAsync(_listener));
        }
    }

    /// <summary>The replica's requests still reach the member, but its answers are held back until <see cref="ReleaseAnswers"/>.</summary>
    public void HoldAnswers() => _answers = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);

    /// <summary>The answers held back flow on, in order, and new ones with them.</summary>
    public void ReleaseAnswers() => _answers.TrySetResult();

    private static TaskCompletionSource Flowing()
    {
        var flowing = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        flowing.SetResult();
        return flowing;
    }

    private async Task AcceptAsync(TcpListener listener)
    {
        try
        {
            while (!_stop.IsCancellationRequested)
            {
                var inbound = await listener.AcceptTcpClientAsync(_stop.Token);
                var outbound = new TcpClient();
                await outbound.ConnectAsync(_target.Host, _target.Port, _stop.Token);
                lock (_connections)
                {
                    if (_stop.IsCancellationRequested || _cut)
                    {
                        inbound.Dispose();
                        outbound.Dispose();
                        continue;
                    }
                    _connections.Add(inbound);
                    _connections.Add(outbound);
                }
                _ = PumpAsync(inbound.GetStream(), outbound.GetStream(), answers: false);
                _ = PumpAsync(outbound.GetStream(), inbound.GetStream(), answers: true);
            }
        }
        catch (Exception e) when (e is OperationCanceledException or SocketException or ObjectDisposedException)
        {
        }
    }

    private async Task PumpAsync(NetworkStream from, NetworkStream to, bool answers)
    {
        var buffer = new byte[64 * 1024];
        try
        {
            int read;
            while ((read = await from.ReadAsync(buffer, _stop.Token)) > 0)
            {
                if (answers)
                    await _answers.Task.WaitAsync(_stop.Token);
                await to.WriteAsync(buffer.AsMemory(0, read), _stop.Token);
            }
        }
        catch (Exception e) when (e is OperationCanceledException or IOException or ObjectDisposedException)
        {
        }
        finally
        {
            from.Dispose();
            to.Dispose();
        }
    }

    public async ValueTask DisposeAsync()
    {
        Cut();
        await _stop.CancelAsync();
        await _accept;
        _stop.Dispose();
    }
}
