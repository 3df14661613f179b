using System.Net;
using System.Net.Sockets;

namespace DmaBroker.Cluster.Tests;

/// <summary>
/// A loopback TCP forwarder in front of an etcd member, so a test can cut one replica off from
/// etcd (a partition, or a dead replica as etcd sees it) while the others keep talking to it.
/// </summary>
public sealed class TcpProxy : IAsyncDisposable
{
    private readonly TcpListener _listener = new(IPAddress.Loopback, 0);
    private readonly Uri _target;
    private readonly List<TcpClient> _connections = [];
    private readonly CancellationTokenSource _stop = new();
    private readonly Task _accept;

    public TcpProxy(Uri target)
    {
        _target = target;
        _listener.Start();
        Endpoint = new Uri($"http://127.0.0.1:{((IPEndPoint)_listener.LocalEndpoint).Port}");
        _accept = AcceptAsync();
    }

    /// <summary>Where a replica connects instead of the member.</summary>
    public Uri Endpoint { get; }

    /// <summary>Closes every connection and refuses new ones: nothing gets through any more.</summary>
    public void Cut()
    {
        _stop.Cancel();
        _listener.Stop();
        lock (_connections)
        {
            foreach (var c in _connections)
                c.Dispose();
            _connections.Clear();
        }
    }

    private async Task AcceptAsync()
    {
        try
        {
            while (!_stop.IsCancellationRequested)
            {
                var inbound = await _listener.AcceptTcpClientAsync(_stop.Token);
                var outbound = new TcpClient();
                await outbound.ConnectAsync(_target.Host, _target.Port, _stop.Token);
                lock (_connections)
                {
                    if (_stop.IsCancellationRequested)
                    {
                        inbound.Dispose();
                        outbound.Dispose();
                        return;
                    }
                    _connections.Add(inbound);
                    _connections.Add(outbound);
                }
                _ = PumpAsync(inbound.GetStream(), outbound.GetStream());
                _ = PumpAsync(outbound.GetStream(), inbound.GetStream());
            }
        }
        catch (Exception e) when (e is OperationCanceledException or SocketException or ObjectDisposedException)
        {
        }
    }

    private async Task PumpAsync(NetworkStream from, NetworkStream to)
    {
        try
        {
            await from.CopyToAsync(to, _stop.Token);
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
        await _accept;
        _stop.Dispose();
    }
}
